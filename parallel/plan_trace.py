"""Tracing for the memory planner: what one block (or the embedding + head + loss) holds while
it runs forward and backward, measured on the meta device at the real shape.

`LiveBytes` follows every storage an op allocates until it is freed; `_CudaEmulation` replays on
meta tensors what a CUDA step changes (autocast's casts, the fused attention and GLA kernels), and
`ops.meta_as_cuda` sends the loss (the Triton logit gradient) and the experts (grouped GEMMs)
down their CUDA paths; `trace` runs one piece under them and returns
its `Piece`. `parallel/plan.py` composes the pieces into a step.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from model.context import SequenceContext
from model.moe import LocalDispatcher
from ops.attention import triton_attn
from ops.gla.triton_chunk import chunk_gla_triton
from ops import meta_as_cuda
from .recompute import apply_recompute


class LiveBytes(TorchDispatchMode):
    """Follows every storage that an op under this mode allocates until it is freed.

    Whole storages count (a saved view keeps its base alive), so a sum is what the allocator holds,
    on meta tensors as on real ones. Storages made before (parameters, inputs) and views of them
    never count. `exclude(t)` drops t's storage from every count, past and future. `mark()` is a
    position in the event log, for `alive` and `peak`.
    """

    def __init__(self):
        super().__init__()
        self._serial: dict[int, int] = {}   # storage address -> serial of the live allocation
        self._bytes: list[int] = []         # serial -> bytes
        self._events: list[int] = []        # serial (allocated) or ~serial (freed)
        self._excluded: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                self.track(t)
        return out

    def track(self, t: torch.Tensor) -> int:
        """The serial of t's storage, followed from now on if it was not already."""
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self._serial:
            self._serial[key] = len(self._bytes)
            self._bytes.append(storage.nbytes())
            self._events.append(self._serial[key])
            weakref.finalize(storage, self._free, key)
        return self._serial[key]

    def _free(self, key: int) -> None:
        self._events.append(~self._serial.pop(key))

    def exclude(self, t: torch.Tensor) -> None:
        self._excluded.add(self.track(t))

    def mark(self) -> int:
        return len(self._events)

    def alive(self, at: int) -> set[int]:
        live: set[int] = set()
        for e in self._events[:at]:
            live.add(e) if e >= 0 else live.discard(~e)
        return live - self._excluded

    def bytes(self, serials) -> int:
        return sum(self._bytes[s] for s in serials)

    def peak(self, start: int, end: int, skip=frozenset()) -> int:
        """Most bytes alive at once between two marks, leaving out the serials in `skip`."""
        return self.peak_of(start, end, skip)[0]

    def peak_of(self, start: int, end: int, skip=frozenset(), part=frozenset(), until=None) -> tuple[int, int]:
        """(most bytes alive at once between two marks, leaving out the serials in `skip`; the
        bytes of the serials in `part` alive at the first moment of that most). until: {serial:
        mark}, serials counted as freed at that mark (after `start`)."""
        skip = self._excluded | set(skip)
        alive = self.alive(start) - skip
        now = most = self.bytes(alive)
        mine = at_most = self.bytes(alive & set(part))
        events = list(self._events[start:end])
        for s, at in sorted((until or {}).items(), key=lambda item: -item[1]):
            events.insert(at - start, ~s)
        for e in events:
            s = e if e >= 0 else ~e
            if s not in skip:
                sign = 1 if e >= 0 else -1
                now += sign * self._bytes[s]
                mine += sign * self._bytes[s] * (s in part)
                if now > most:
                    most, at_most = now, mine
        return most, at_most


# torch.autocast("cuda") op lists, the part model code reaches: matmul-like ops run in the
# autocast dtype; 16-bit inputs of the others are cast to float32, or the op is told to compute
# in float32 (autocast's "set_opt_dtype" ops, whose inputs are not copied).
_LOW_PRECISION = frozenset({"linear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm",
                            "baddbmm", "einsum", "conv1d", "scaled_dot_product_attention"})
_FP32 = frozenset({"exp", "expm1", "log", "log1p", "pow", "__pow__", "__rpow__", "rsqrt", "reciprocal",
                   "softplus", "norm", "layer_norm", "group_norm", "cross_entropy", "nll_loss", "mse_loss"})
_FP32_DTYPE = frozenset({"sum", "prod", "cumsum", "cumprod", "softmax", "log_softmax"})
_HALF = (torch.float16, torch.bfloat16)


class _LogSigmoidCuda(torch.autograd.Function):
    """F.logsigmoid as CUDA runs it, in bytes: its backward keeps the input alone (the CPU and meta
    kernels also keep a buffer of the input's size, which CUDA returns empty: the GLA gate's
    [T, kv_dim] fp32 per layer). Meta tensors only; the values are not computed."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.empty_like(ctx.saved_tensors[0])


class _CudaEmulation(TorchFunctionMode):
    """What a CUDA step changes about the tensors it keeps, replayed on meta tensors.

    autocast (`dtype` set) as torch.autocast("cuda") casts: floating inputs of _LOW_PRECISION ops to
    `dtype` (not of a call with out= or out_dtype=, which autocast leaves alone), 16-bit inputs of
    _FP32 ops to float32, _FP32_DTYPE ops on 16-bit inputs given dtype=float32; leaf weights are
    cast once and kept (`casts`, counted as gathered weights).
    Like autocast this runs above autograd, so autograd saves the cast copies, as on CUDA.
    scaled_dot_product_attention runs the fused kernel CUDA would pick (`_fused_attention`), and
    logsigmoid keeps what CUDA keeps (`_LogSigmoidCuda`).
    """

    def __init__(self, dtype: torch.dtype | None):
        super().__init__()
        self.dtype = dtype
        self.casts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", None)
        if self.dtype is not None and name in _LOW_PRECISION and not {"out", "out_dtype"} & kwargs.keys():
            args, kwargs = tree_map(self._cast, (args, kwargs))
        elif self.dtype is not None and name in _FP32:
            args, kwargs = tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) and t.dtype in _HALF else t,
                                    (args, kwargs))
        elif self.dtype is not None and name in _FP32_DTYPE and kwargs.get("dtype") is None and any(
                isinstance(t, torch.Tensor) and t.dtype in _HALF for t in args[:1]):
            kwargs["dtype"] = torch.float32
        if name == "scaled_dot_product_attention":
            return _fused_attention(*args, **kwargs)
        if name == "log_sigmoid":
            return _LogSigmoidCuda.apply(*args, **kwargs)
        return func(*args, **kwargs)

    def _cast(self, t):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype not in (self.dtype, torch.float64)):
            return t
        if not (t.is_leaf and t.requires_grad):
            return t.to(self.dtype)
        if id(t) not in self.casts:  # autocast's weight cache; holding t keeps its id unique
            self.casts[id(t)] = (t, t.to(self.dtype))
        return self.casts[id(t)][1]


def _fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention as CUDA runs it, q [B, Hq, T, D], k/v [B, Hkv, S, D] ->
    [B, Hq, T, D]: flash attention (GQA native) for 16-bit inputs without a mask, else the
    memory-efficient kernel, for which SDPA turns a boolean mask into an additive one of q's dtype,
    kept unexpanded (a broadcast view to [B, Hq, T, S]: on an H200 with torch 2.11 a mask whose
    last dim is not a multiple of 16 is not padded into a full copy either, measured 2026-12-01).
    The kernels' meta functions give the shapes and layouts, their autograd formulas what is
    saved. (cuDNN attention, which some builds prefer on sm90/sm100, saves the same tensors.)"""
    aten = torch.ops.aten
    if attn_mask is None and q.dtype in _HALF:
        return aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]
    bias = None
    if attn_mask is not None:
        shape = (*q.shape[:3], k.shape[2])
        bias = q.new_empty(attn_mask.shape).expand(shape)
    return aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, dropout_p, is_causal, scale=scale)[0]


class _PlanContext(SequenceContext):
    """The single-device context, noting whether a mixer used the rope tables, and sending the
    sequence-mixing cores to what CUDA runs when planning for CUDA (meta tensors would get the
    reference ops): the Triton GLA kernels, whose autograd Function allocates its buffers on meta
    and launches nothing, and for softmax attention the footprint of the fused kernels
    `ops.attention` picks on CUDA (flash varlen, flex): q, k, v, the output and the log-sum-exp,
    with sink keys joining the keys, never a mask."""

    def __init__(self, position_ids, cuda: bool):
        super().__init__(position_ids)
        self.cuda, self.used_rope = cuda, False

    def rope(self, head_dim, theta):
        self.used_rope = True
        return super().rope(head_dim, theta)

    def softmax_attention(self, q, k, v, *, window=None, sink_k=None, sink_v=None, scale=None):
        if not self.cuda:
            return super().softmax_attention(q, k, v, window=window, sink_k=sink_k, sink_v=sink_v, scale=scale)
        window = None if window is not None and window >= q.shape[1] - 1 else window  # as attention()
        masked = sink_k is not None or window is not None or self.cu_seqlens is not None
        if masked and triton_attn is not None and q.dtype in triton_attn.DTYPES \
                and q.shape[-1] in triton_attn.HEAD_DIMS:
            sinks = {} if sink_k is None else dict(sink_k=sink_k.to(q.dtype), sink_v=sink_v.to(q.dtype))
            return triton_attn.attention_triton(q, k, v, window=window, cu_seqlens=self.cu_seqlens,
                                                scale=scale, **sinks)
        if sink_k is not None:
            b = q.shape[0]
            k, v = (torch.cat([s.unsqueeze(0).expand(b, -1, -1, -1).to(x.dtype), x], dim=1)
                    for s, x in ((sink_k, k), (sink_v, v)))
        out = _fused_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                               scale=scale)
        return out.transpose(1, 2)

    def linear_attention(self, q, k, v, g, *, scale=None):
        if not self.cuda:
            return super().linear_attention(q, k, v, g, scale=scale)
        return chunk_gla_triton(q, k, v, g, scale=scale, cu_seqlens=self.cu_seqlens)[0]


class _BalancedDispatcher(LocalDispatcher):
    """The local dispatcher with perfectly balanced expert counts (meta tensors carry no routing).
    Every expert-side tensor has one row per routed token, so any routing gives the same bytes."""

    def dispatch(self, x, topk_idx, num_experts):
        rows, _, handle = super().dispatch(x, topk_idx, num_experts)
        counts = torch.full((num_experts,), rows.shape[0] // num_experts, dtype=torch.int64)
        counts[: rows.shape[0] % num_experts] += 1
        return rows, counts, handle


def balance(model: nn.Module) -> None:
    """Gives the MoE layers of `model` the balanced dispatcher."""
    for block in model.layers:
        if isinstance(getattr(block.mlp, "dispatcher", None), LocalDispatcher):
            block.mlp.dispatcher = _BalancedDispatcher()


class _Sink(torch.autograd.Function):
    """Ends a traced block without holding its outputs; backward hands each a fresh gradient, as
    the next block's backward (or the balance loss) would."""

    @staticmethod
    def forward(ctx, *outputs):
        ctx.like = [(t.shape, t.dtype, t.device) for t in outputs]
        return outputs[0].new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return tuple(torch.ones(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.like)


def _grad_tensors(obj) -> list[torch.Tensor]:
    """Tensors that carry a gradient in a block's extra output (None, a tensor, a dataclass)."""
    if dataclasses.is_dataclass(obj):
        obj = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    return [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor) and t.requires_grad]


@dataclass(frozen=True)
class Setup:
    """How a step computes: dtype of the weights blocks see, autocast dtype, CUDA kernels."""
    weights: torch.dtype
    autocast: torch.dtype | None
    cuda: bool


@dataclass(frozen=True)
class Piece:
    """Bytes of one traced block type, or of the embedding + head + loss."""
    kept: int            # held for backward at the end of the forward, its input and output apart
    keeps_input: bool    # its input [B, T, hidden] stays alive until its backward
    keeps_output: bool
    rope: int            # the rope tables (cos, sin [B, T, head_dim], one pair per step) if it uses them
    fwd_peak: int        # most bytes alive during its forward, its input included
    bwd_peak: int        # most during its backward: kept bytes, gradients, recomputation, temporaries
    bwd_grad_peak: int   # the same, its own parameter gradients counted from when they are made
    #                      (head piece: up to the embedding backward, which the real step runs last)
    bwd_grads: int       # its own parameter gradients alive at bwd_grad_peak
    acc_peak: int        # the backward's most with each own gradient counted from when it is made
    #                      until it is accumulated (freed), as when an earlier one exists
    embed_peak: int = 0  # head piece: most during the embedding backward, with the embeddings'
    #                      gradients and without the root's (the step counts those as done)
    embed_grads: int = 0  # the embeddings' gradients alive at embed_peak


def trace(model: nn.Module, setup: Setup, b: int, t: int, layer: int | None, recompute: str) -> Piece:
    """Runs block `layer` (None: the model without blocks, i.e. embedding, head and loss) forward
    and backward on inputs [b, t] and reads the bytes off `LiveBytes`. The model lives on the meta
    device when planning, on a real one when tests compare."""
    cfg, device = model.cfg, model.embeddings.weight.device
    live, emulation, loss_path = LiveBytes(), contextlib.nullcontext(), contextlib.nullcontext
    if setup.cuda and device.type == "meta":
        emulation, loss_path = _CudaEmulation(setup.autocast), meta_as_cuda
    elif setup.autocast is not None:  # real tensors (tests): the real autocast
        emulation = torch.autocast(device.type, dtype=setup.autocast)

    def emulate(fn):  # a checkpoint recomputes the emulated forward during backward
        def run(*args, **kwargs):
            with emulation, loss_path():
                return fn(*args, **kwargs)
        return run

    part = model if layer is None else copy.deepcopy(model.layers[layer])
    if layer is not None:
        part.forward = emulate(part.forward)
        apply_recompute([part], recompute)
    # parameter gradients by where the step counts them: the embeddings' run last (untied only)
    embedding = {id(p) for p in model.embeddings.parameters()} if layer is None and model.lm_head is not None else set()
    grads: dict[bool, set[int]] = {True: set(), False: set()}
    accumulated: dict[int, int] = {}  # serial of a gradient -> mark of its first accumulation

    def accumulate(p):
        serial = live.track(p.grad)
        grads[id(p) in embedding].add(serial)
        accumulated.setdefault(serial, live.mark())
    hooks = [p.register_post_accumulate_grad_hook(accumulate) for p in part.parameters()]
    seed = torch.zeros(1, 1, 1, dtype=setup.weights, device=device, requires_grad=True)
    ids = torch.zeros(b, t, dtype=torch.long, device=device)
    ctx, layers, edge = _PlanContext(ids, setup.cuda and device.type == "meta"), model.layers, {}
    rope = sum(x.untyped_storage().nbytes() for x in ctx.rope(cfg.head_dim, cfg.rope_theta))  # not traced
    ctx.used_rope = False
    try:
        with live:
            if layer is None:
                model.layers = nn.ModuleList()
                def embedded(module, args, h):  # its gradient arrives as the embedding backward begins
                    edge["input"] = live.track(h)
                    h.register_hook(lambda g: edge.update(embed_bwd=live.mark()))
                hook = model.embeddings.register_forward_hook(embedded)
                out = emulate(model)(ids, labels=ids, ctx=ctx)
                hook.remove()
                loss = out.loss_sum + out.aux_loss
                del out
            else:
                x = seed.expand(b, t, cfg.hidden_size).clone()  # not a leaf: only the graph can keep it
                edge["input"] = live.track(x)
                y, extra = part(x, ctx)
                edge["output"] = live.track(y)
                loss = _Sink.apply(y, *_grad_tensors(extra))
                del x, y, extra
            live.exclude(loss)
            rope *= ctx.used_rope
            del ctx
            end_fwd = live.mark()
            loss.backward()
        for _, cast in getattr(emulation, "casts", {}).values():
            live.exclude(cast)
    finally:
        model.layers = layers
        for p, hook in zip(part.parameters(), hooks):
            p.grad = None
            hook.remove()
    alive, edges, end = live.alive(end_fwd), {edge["input"], edge.get("output")}, live.mark()
    embed_bwd = edge.get("embed_bwd", end)
    return Piece(live.bytes(alive - edges), edge["input"] in alive, edge.get("output") in alive, rope,
                 live.peak(0, end_fwd), live.peak(end_fwd, end, grads[True] | grads[False]),
                 *live.peak_of(end_fwd, embed_bwd, grads[True], grads[False]),
                 live.peak_of(end_fwd, end, until=accumulated)[0],
                 *(live.peak_of(embed_bwd, end, grads[False], grads[True]) if embed_bwd < end else (0, 0)))
