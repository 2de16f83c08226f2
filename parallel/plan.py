"""Memory planner: the bytes one training step holds on each rank, counted without allocating.

State is counted from the parameter shapes as the engine (parallel/engine.py, FSDP2) lays it out:
every parameter sharded along dim 0 over the dp ranks, ceil(rows / dp) rows per rank (padded).
Activations are measured (`parallel/plan_trace.py`): each distinct block type, and the embedding
+ head + loss, runs forward and backward once on the meta device at the real shape, with the
engine's own recomputation wrapping and, for CUDA, autocast's casts and the fused attention
kernels replayed on meta tensors.
docs/PLANNER.md lists the rules and how each was checked.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from model import build_model
from model.moe import Experts
from .pipeline import Stage, check_pipeline, cut_stages
from .plan_trace import LiveBytes, Piece, Setup, balance, trace
from .recompute import MODES

__all__ = ["GiB", "LiveBytes", "MemoryPlan", "balance", "check_fits", "format_plan", "plan_memory", "smallest_dp", "bubble"]

GiB = 2 ** 30


_MODELS: dict = {}
_PIECES: dict = {}


def _meta_model(cfg, dtype: torch.dtype) -> nn.Module:
    """The model on the meta device in `dtype`, MoE layers with the balanced dispatcher (cached)."""
    key = (repr(cfg), dtype)
    if key not in _MODELS:
        model = build_model(cfg, device="meta").to(dtype)
        balance(model)
        _MODELS[key] = model
    return _MODELS[key]


def _pieces(cfg, setup: Setup, b: int, t: int, recompute: str) -> list[Piece]:
    """One Piece per layer (traced once per block type, cached), then the embedding + head + loss."""
    model, kinds = _meta_model(cfg, setup.weights), list(zip(cfg.mixers, cfg.ffns))
    out = []
    for i, kind in enumerate(kinds + [None]):
        key = (repr(cfg), setup, b, t, kind, recompute if kind else None)
        if key not in _PIECES:
            _PIECES[key] = trace(model, setup, b, t, i if kind else None, recompute)
        out.append(_PIECES[key])
    return out


@dataclass
class MemoryPlan:
    """Bytes per rank of one optimizer step (all ranks alike: only data parallelism varies).

    For each train.recompute setting s, the step is a sequence of moments: the forward of each
    block, of the head and loss, their backward, each block's backward in reverse, the embedding
    backward, the optimizer step. peaks[s] is the largest over the moments of
        params + optimizer + gradients held then + weight copies held then
        + activations, logits and temporaries alive then;
    worst[s] names that moment and held[s] gives its last three terms. Without gradient
    accumulation no parameter gradient exists in the forward (the trainer sets them to None
    after each step) and a unit's backward holds what the units before it in backward order left
    and its own; with accumulation all of `grads` at every moment, and a backward's new gradients
    until they are added to the existing ones. The optimizer step holds the
    (reduced) gradients and the optimizer's temporaries. peak is that of the configured setting.
    """
    model: str
    dp: int
    sp: int                      # sequence-parallel ranks: a rank holds seq_len / sp tokens of a row
    ep: int                      # expert-parallel ranks (within dp): a rank holds E / ep experts
    zero_stage: int
    sharded: bool                # FSDP2 manages the weights (dp > 1); one rank trains a plain model
    offload: bool
    recompute: str
    micro_batch: int
    seq_len: int                 # data.seq_len (the whole rows)
    tokens_per_micro_batch: int  # on one rank
    compute_dtype: str
    params: int                  # fp32 master weights
    grads: int                   # most gradient bytes at once: the fp32 ones and one unit's being reduced
    optimizer: int               # AdamW moments, fp32
    gathered_weights: int        # most compute-dtype copies of the weights at once
    host: int                    # master weights, gradients and AdamW state in host memory (offload)
    activations: dict[str, int]  # held for backward at the end of the forward, per recompute setting
    logits: int                  # head + loss at their worst: logits [B, T, V], fp32 copy, log-probs, grads
    worst: dict[str, str]        # the moment of the peak, per recompute setting
    held: dict[str, dict[str, int]]  # at it: "gradients", "weight copies", "activations, temporaries"
    peaks: dict[str, int]
    peak: int
    pp: int = 1                  # pipeline stages; the numbers above are the stage with the highest peak
    micro_batches: int = 1       # per rank and optimizer step
    bubble: float = 0.0          # 1F1B idle share of the step, (pp - 1) / (micro_batches + pp - 1)
    stages: list = dataclasses.field(default_factory=list)  # pp > 1: per stage its layers and bytes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class _State:
    """Bytes per rank of the weights, gradients and optimizer, and how the gradients and gathered
    weights come and go during a step. Units in backward order: the root (final norm, LM head),
    the blocks from the last to the first, the embeddings (none when tied to the head)."""
    params: int
    grads: int               # the most gradient bytes at once: every unit's, plus one in flight
    optimizer: int
    gathered: int            # the most compute-dtype weight copies at once
    host: int
    done: tuple[int, ...]    # per unit: gradient bytes it leaves once its backward is over
    after: tuple[int, ...]   # per unit: bytes its backward adds beyond the trace's own gradients
    casts: tuple[int, ...]   # per unit, one rank under autocast: its bf16 weight copies (else ())
    final: int               # gradients at the optimizer step
    step: int                # the optimizer step's temporaries
    accumulate: bool         # gradients exist from the step's second micro-batch on


def _state(model: nn.Module, stage: int, dp: int, offload: bool, c: int, accumulate: bool, cuda: bool,
           ep: int = 1) -> _State:
    """The state of `model` (fp32, on meta) on one of `dp` ranks (all sharing the dense state:
    data x sequence parallel); c: bytes per element of the compute dtype. FSDP2 units: the
    embeddings (unless tied), each block, and the root, which stays gathered for the whole step.
    Under expert parallelism (ep > 1) a rank holds E / ep experts of each MoE layer, sharded over
    the dp / ep ranks holding the same ones (parallel/engine.py: by experts when they divide
    evenly, else by rows of dim 1); they count in their block's unit."""
    blocks = model.blocks() if hasattr(model, "blocks") else list(model.layers)  # a pipeline Stage or a Decoder
    embedded = model.embeddings is not None and not model.cfg.tie_word_embeddings  # its own unit
    parts = [list(b.parameters()) for b in blocks[::-1]] + ([list(model.embeddings.parameters())] if embedded else [])
    inner = {id(p) for u in parts for p in u}
    parts.insert(0, [p for p in model.parameters() if id(p) not in inner])
    experts = {id(p) for m in model.modules() if isinstance(m, Experts) for p in m.parameters()} if ep > 1 else set()

    def rows(p) -> int:  # elements of p's shard on the first rank (FSDP2 pads: ceil)
        if id(p) not in experts:
            return -(-p.shape[0] // dp) * (p.numel() // p.shape[0])
        local, ranks = p.shape[0] // ep, dp // ep
        if local % ranks == 0:
            return local // ranks * (p.numel() // p.shape[0])
        return local * -(-p.shape[1] // ranks) * (p.numel() // (p.shape[0] * p.shape[1]))

    full = lambda p: p.numel() // ep if id(p) in experts else p.numel()  # noqa: E731  (gathered here)
    units = [sum(full(p) for p in u) for u in parts]
    total, shards = sum(units), [sum(rows(p) for p in u) for u in parts]
    step = 0 if cuda or offload else _adamw_temporaries([4 * rows(p) for p in model.parameters()],
                                                         [p.ndim >= 2 for p in model.parameters()])
    if dp == 1:  # no engine: fp32 weights, gradients (the trace's own) and moments
        # autocast casts the weights of matmul-like ops; the embedding lookup reads the fp32 table
        casts = tuple(c * n for n in units[:len(units) - embedded]) + (0,) * embedded if c == 2 else ()
        return _State(4 * total, 4 * total, 8 * total, sum(casts), 0, tuple(4 * n for n in units),
                      (0,) * len(units), casts, 4 * total, step, accumulate)
    # A unit's gradient leaves its fp32 shard (all of it at stage 0, replicated; in host memory
    # with offload), and at stage 1 its full-size fp32 accumulation until the step's
    # reduce-scatter. Its backward makes the unsharded gradient in the compute dtype (the trace's
    # own); from stage 2 on a full-size fp32 copy is reduce-scattered as the backward ends.
    done = tuple((0 if offload else 4 * (n if stage == 0 else k)) + 4 * n * (stage == 1) for n, k in zip(units, shards))
    after = tuple(d + 4 * n * (stage > 1) for d, n in zip(done, units))
    grads = sum(done) + max(c * n + 4 * n * (stage > 1) for n in units)
    # stage 3 frees each unit's weights after use: the one computing and the next, prefetched
    order = units[1:][::-1]  # forward order, the root apart
    in_flight = max(a + b for a, b in zip(order, order[1:] + [0]))
    gathered = c * (total if stage < 3 else units[0] + in_flight)
    sharded = 0 if offload else 4 * (total if stage == 0 else sum(shards))
    return _State(sharded, grads, 2 * sharded, gathered, 16 * sum(shards) * offload, done, after, (), sharded, step,
                  accumulate)


def _adamw_temporaries(sizes: list[int], decays: list[bool]) -> int:
    """Most bytes single-tensor AdamW (the CPU's; CUDA runs the fused kernel) allocates at once,
    for fp32 parameters of `sizes` bytes in the groups of train.optim.build_optimizer (matrices
    decay, vectors do not). Per parameter it computes denom = sqrt(v) / bc2 + eps: the square
    root and the quotient are alive together while the previous parameter's denom is still held."""
    most = 0
    for group in ([n for n, d in zip(sizes, decays) if d], [n for n, d in zip(sizes, decays) if not d]):
        most = max([most] + [2 * n + previous for n, previous in zip(group, [0] + group[:-1])])
    return most


def _timeline(layers: list[Piece], head: Piece, r: int, state: _State, recompute: str):
    """(bytes the blocks hold for backward at the end of the forward, the step's moments as
    (name, activations and temporaries, gradients, gathered weights)); r: bytes of one residual
    [B, T, hidden].

    The forward runs the blocks, then the head; the backward the head, then the blocks in
    reverse, block i's backward seeing what the blocks below it hold, then the embeddings; then
    the optimizer steps. A residual between two blocks is kept if the block after keeps its input
    or the block before its output. The rope tables, made once per step, live until block 0's
    backward (held by the sequence context or saved)."""
    n, rope, acc = len(layers), max(p.rope for p in layers), state.accumulate
    casts = state.casts

    def grads(k: int, own: int) -> int:
        """Gradients while unit k (backward order: 0 the root, n - i block i, n + 1 the
        embeddings) runs its backward: with accumulation all of them; without, what the units
        before it left, what its backward adds and its own gradients from the trace (`own`)."""
        return state.grads if acc else sum(state.done[:k]) + (state.after[k] if k < len(state.after) else 0) + own

    # Weight copies: gathered for the whole step when sharded. One rank under autocast: the cache
    # holds each copy from its first use to the end of the forward, then a copy lives while a
    # saved graph holds it: without recomputation until its unit's backward; with it, the
    # blocks' copies go with the forward graph and are cast again in each block's backward. No
    # graph saves the root's copy (the LM head's): the chunked loss (ops.loss) makes the head's
    # gradients in its forward, so that copy is gone when the forward ends.
    def weights(k: int, backward: bool) -> int:
        if not casts:
            return state.gathered
        if not backward:
            return sum(casts[k:n + 1])
        return (casts[k] if k else 0) if recompute != "none" else sum(casts[max(k, 1):n + 1])

    def backward(p: Piece, k: int, below: int):  # (activations and temporaries, gradients)
        if acc:  # a gradient made in this backward lives until it is added to the existing one
            return below + p.acc_peak, state.grads
        return below + p.bwd_grad_peak - p.bwd_grads, grads(k, p.bwd_grads)

    held, prev_out, below, moments = rope, False, [], []
    for i, p in enumerate(layers):
        moments.append((f"forward block {i}", held + p.fwd_peak, state.grads * acc, weights(n - i, False)))
        below.append((held, prev_out))
        held += p.kept + r * (p.keeps_input or prev_out)
        prev_out = p.keeps_output
    moments += [("forward head and loss", held + head.fwd_peak, state.grads * acc, weights(0, False)),
                ("head and loss backward", *backward(head, 0, held + r * (prev_out and not head.keeps_input)),
                 weights(0, True))]
    for i in range(n - 1, -1, -1):
        held_below, kept_before = below[i]
        extra = r * (kept_before and not layers[i].keeps_input)
        moments.append((f"backward block {i}", *backward(layers[i], n - i, held_below + extra), weights(n - i, True)))
    # the rope tables are gone: the trace's embedding backward alone (with accumulation the head
    # piece's whole backward, which the head moment already exceeds)
    embed = ((head.acc_peak, state.grads) if acc
             else (head.embed_peak - head.embed_grads, grads(n + 1, head.embed_grads)))
    moments.append(("embedding backward", *embed, 0 if casts else state.gathered))
    moments.append(("optimizer step", state.step, state.final, 0))
    return held + r * prev_out, moments


def _settings(cfg, dp: int, device_type: str):
    """Checks what the planner covers; returns (micro-batch, setup, ZeRO stage, the step's
    micro-batches per rank)."""
    par, train = cfg.parallel, cfg.train
    sp, ep = par.sp, par.ep
    if dp % ep:
        raise ValueError(f"parallel.ep={ep} must divide the data-parallel size {dp}")
    if ep > 1 and "moe" not in cfg.model.ffns:
        raise ValueError(f"parallel.ep={ep}: model {cfg.model.name} has no MoE layer; set parallel.ep=1")
    if ep > 1 and cfg.model.moe.num_experts % ep:
        raise ValueError(f"model.moe.num_experts = {cfg.model.moe.num_experts} is not divisible by "
                         f"parallel.ep = {ep}")
    if cfg.data.seq_len % sp:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} must be divisible by parallel.sp={sp}")
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"device type must be cuda or cpu, got {device_type!r}")
    if dp < 1:
        raise ValueError(f"the data-parallel size must be >= 1, got {dp}")
    if par.offload_optimizer and (dp * sp == 1 or device_type != "cuda"):
        raise ValueError("parallel.offload_optimizer=true needs the sharded engine on CUDA (data-parallel "
                         f"size > 1), planned: dp={dp} on {device_type}")
    bf16 = device_type == "cuda" and train.precision != "fp32"
    # one rank: fp32 weights under autocast; the sharded engine computes with bf16 copies of them
    setup = Setup(torch.bfloat16 if bf16 and dp * sp > 1 else torch.float32, torch.bfloat16 if bf16 else None,
                   device_type == "cuda")
    if train.global_batch % dp:
        raise ValueError(f"train.global_batch={train.global_batch} must be divisible by the data-parallel size {dp}")
    local = train.global_batch // dp
    if local % (train.micro_batch or local):
        raise ValueError(f"train.micro_batch={train.micro_batch} must divide the per-rank batch {local} "
                         f"(train.global_batch={train.global_batch} / dp={dp})")
    micro = train.micro_batch or local
    check_pipeline(cfg, par.pp, local // micro)
    # sequence-parallel ranks shard the state with the data-parallel ones
    return micro, setup, par.stage_for(dp * sp), local // micro


def _parts(cfg, dp: int, device_type: str) -> list[tuple[nn.Module, range, bool, bool]]:
    """(the model part a rank holds, its blocks, first, last) for each pipeline stage (one
    part, the whole decoder, without pipeline parallelism): `parallel.pipeline.cut_stages`."""
    model, pp = _meta_model(cfg.model, torch.float32), cfg.parallel.pp
    if pp == 1:
        return [(model, range(cfg.model.num_layers), True, True)]
    bounds = cut_stages(cfg.model, cfg.data.seq_len, pp)
    return [(Stage(model, r, k == 0, k == pp - 1, torch.float32), r, k == 0, k == pp - 1) for k, r in enumerate(bounds)]


def _stage_head(head: Piece, first: bool, last: bool, residual: int) -> Piece:
    """The head piece (embedding + head + loss) cut to what a pipeline stage runs: the last
    stage the head and loss, the first the embedding lookup (its output the residual) and its
    backward, a middle stage neither."""
    if first and last:
        return head
    if last:
        return dataclasses.replace(head, embed_peak=0, embed_grads=0)
    embed = head.embed_peak if first else 0
    return Piece(kept=0, keeps_input=False, keeps_output=False, rope=0, fwd_peak=residual * first, bwd_peak=0,
                 bwd_grad_peak=0, bwd_grads=0, acc_peak=embed, embed_peak=embed, embed_grads=head.embed_grads * first)


def bubble(pp: int, micro_batches: int) -> float:
    """The idle share of a 1F1B step over equal stages: (pp - 1) / (micro_batches + pp - 1)."""
    return (pp - 1) / (micro_batches + pp - 1)


def plan_memory(cfg, dp: int, device_type: str = "cuda") -> MemoryPlan:
    """cfg: train.config.RunConfig; dp: data-parallel size (world / (parallel.pp x parallel.sp);
    expert parallelism is carved out of it).

    Under expert parallelism a rank gathers and holds state for E / ep experts per MoE layer; the
    activations are those of one device with balanced routing (the all-to-all's receive buffer,
    as large as the rows routed, is transient and not counted). Under sequence parallelism a rank holds seq_len / sp tokens of each row and the state is
    sharded over dp x sp ranks; the blocks are traced at the slice length (Ulysses' full-sequence
    attention over heads / sp holds as many bytes as the slice over all heads; the halo keys and
    the gathered GLA states are not counted).

    Under pipeline parallelism every stage is planned on its own (`stages`: its blocks, state,
    activations and peak): its blocks' state, the embeddings on the first, the head and loss on
    the last; 1F1B holds the activations of min(pp - stage, micro-batches) micro-batches at
    once on a stage (stage 0 the most), counted as that many times one micro-batch's activations
    at the end of its forward, on top of the moments of the one in backward (the hidden states
    received and sent, one [B, T, hidden] each, are not counted). The plan's own numbers are those
    of the stage with the highest peak."""
    b, setup, stage, micro_batches = _settings(cfg, dp, device_type)
    par, m, t = cfg.parallel, cfg.model, cfg.data.seq_len // cfg.parallel.sp
    residual = b * t * m.hidden_size * setup.weights.itemsize
    c, accumulate = 2 if setup.autocast else 4, micro_batches > 1
    plans = []
    for k, (part, blocks, first, last) in enumerate(_parts(cfg, dp, device_type)):
        state = _state(part, stage, dp * par.sp, par.offload_optimizer, c, accumulate, device_type == "cuda", par.ep)
        in_flight = min(par.pp - k, micro_batches)
        activations, worst, held, peaks, logits = {}, {}, {}, {}, 0
        for setting in MODES:
            *layers, head = _pieces(m, setup, b, t, setting)
            head = _stage_head(head, first, last, residual)
            logits = max(head.fwd_peak, head.bwd_peak) if last else 0
            kept, moments = _timeline([layers[i] for i in blocks], head, residual, state, setting)
            waiting = (in_flight - 1) * kept  # the other micro-batches' activations, 1F1B
            name, live, grads, weights = max(moments, key=lambda moment: sum(moment[1:]))
            activations[setting], worst[setting] = kept * in_flight, name
            held[setting] = {"gradients": grads, "weight copies": weights, "activations, temporaries": live + waiting}
            peaks[setting] = state.params + state.optimizer + grads + weights + live + waiting
        plans.append(MemoryPlan(m.name, dp, par.sp, par.ep, stage, dp * par.sp > 1, par.offload_optimizer,
                                cfg.train.recompute, b, cfg.data.seq_len, b * t, "bf16" if setup.autocast else "fp32",
                                state.params, state.grads, state.optimizer, state.gathered, state.host, activations,
                                logits, worst, held, peaks, peaks[cfg.train.recompute], pp=par.pp,
                                micro_batches=micro_batches, bubble=bubble(par.pp, micro_batches)))
        plans[-1].stages = [{"stage": k, "layers": [blocks.start, blocks.stop], "in_flight": in_flight,
                             "params": state.params, "optimizer": state.optimizer, "gradients": state.grads,
                             "gathered_weights": state.gathered, "peaks": peaks}]
    worst_stage = max(plans, key=lambda p: p.peak)
    worst_stage.stages = [p.stages[0] for p in plans] if par.pp > 1 else []
    return worst_stage


def smallest_dp(cfg, gpu_bytes: int, max_dp: int = 4096, device_type: str = "cuda") -> int | None:
    """The smallest data-parallel size whose peak fits `gpu_bytes` (None if none up to max_dp).
    Sizes the batch does not split into (train.global_batch, train.micro_batch, the pipeline's
    micro-batches) are skipped."""
    t = cfg.train
    for dp in range(2 if cfg.parallel.offload_optimizer else 1, max_dp + 1):
        if t.global_batch % dp or (t.micro_batch and (t.global_batch // dp) % t.micro_batch) or dp % cfg.parallel.ep:
            continue
        try:
            _, setup, stage, micro_batches = _settings(cfg, dp, device_type)
        except ValueError:
            continue  # e.g. too few micro-batches to fill the pipeline
        states = [_state(part, stage, dp * cfg.parallel.sp, cfg.parallel.offload_optimizer, 2 if setup.autocast else 4,
                         micro_batches > 1, device_type == "cuda", cfg.parallel.ep)
                  for part, *_ in _parts(cfg, dp, device_type)]
        if max(s.params + s.optimizer + s.final + s.step for s in states) > gpu_bytes:
            continue  # the state alone does not fit on some stage: no need to trace activations
        if plan_memory(cfg, dp, device_type).peak <= gpu_bytes:
            return dp
    return None


def node_layout(cfg, world: int, ranks_per_node: int, ep_bytes: int = 0) -> list[str]:
    """How each group the two-level collectives cover lies over nodes of `ranks_per_node` ranks
    (parallel/mesh.py lays them out), for `launch/plan.py`: the ZeRO group (reduce-scatters and
    weight gathers), the expert all-to-all (with `ep_bytes`, what a rank sends in a step, and
    the share of it that crosses nodes) and the expert-data-parallel group."""
    from .mesh import axis_dims, node_blocks, world_ranks

    par = cfg.parallel
    ranks, stage = world_ranks(par, world)
    if world % ranks_per_node:
        raise ValueError(f"parallel.ranks_per_node={ranks_per_node} does not divide the world size {world}")
    nodes = world // ranks_per_node
    lines = [f"nodes: {nodes} x {ranks_per_node} ranks (parallel.ranks_per_node), two-level collectives "
             f"{'on' if par.two_level else 'off (parallel.two_level=false)'}"]
    axes = ([("shard", "ZeRO reduce-scatter / weight gathers")] if stage >= 1 else [])
    axes += [("ep", "expert all-to-all"), ("expert_shard", "expert ZeRO group")] if par.ep > 1 else []
    for axis, what in axes:
        dims = axis_dims(axis)
        size = math.prod(ranks.shape[d] for d in dims)
        if size == 1:
            continue
        blocks = node_blocks(ranks, dims, ranks_per_node)
        span = len({int(r) // ranks_per_node for r in ranks.permute(*[d for d in range(5) if d not in dims], *dims)
                    .reshape(-1, size)[0]})
        if blocks is None:
            how = "inside one node" if span == 1 else f"{span} nodes, flat"
        else:
            n, per = blocks.shape[1:]
            how = (f"{n} nodes x {per}: two-level" if par.two_level else f"{n} nodes x {per}: flat") + \
                  (f" ({n - 1} cross-node messages per rank and exchange instead of {size - per})"
                   if axis == "ep" else f" (across nodes on 1/{per} of the data)")
        extra = ""
        if axis == "ep" and ep_bytes and span > 1:
            per_node_ranks = size // span
            extra = f"; {ep_bytes * (size - per_node_ranks) / (size - 1) / GiB:.2f} GiB per rank per step cross nodes"
        lines.append(f"  {what} over {size} ranks: {how}{extra}")
    return lines


def check_fits(plan: MemoryPlan, gpu_bytes: int) -> None:
    """Raises ValueError naming the settings that lower the peak, when the plan does not fit."""
    if plan.peak <= gpu_bytes:
        return
    g = lambda n: f"{n / GiB:.1f}"  # noqa: E731
    parts = ", ".join(f"{name} {g(n)}" for name, n in (
        ("parameters", plan.params), ("gradients", plan.grads), ("optimizer", plan.optimizer),
        ("gathered weights", plan.gathered_weights), ("activations", plan.activations[plan.recompute]),
        ("logits", plan.logits)))
    others = ", ".join(f"{s} {g(plan.peaks[s])}" for s in MODES if s != plan.recompute)
    raise ValueError(
        f"{plan.model} does not fit: peak {g(plan.peak)} GiB per rank > {g(gpu_bytes)} GiB of GPU memory at the "
        f"{plan.worst[plan.recompute]} ({parts} GiB). Lower it with parallel.zero_stage (now {plan.zero_stage}; 3 "
        f"shards weights, gradients and optimizer state over the dp ranks), parallel.dp / more GPUs (now {plan.dp}), train.recompute (now {plan.recompute}; "
        f"peak with {others} GiB), train.micro_batch (now {plan.micro_batch}) or data.seq_len (now {plan.seq_len}): "
        f"activations and logits grow with the {plan.tokens_per_micro_batch:,} tokens of a micro-batch")


def format_plan(plan: MemoryPlan, gpu_bytes: int | None = None) -> str:
    """The plan as a table per rank (GiB, MiB for small plans); with gpu_bytes, what fits."""
    unit, div = ("GiB", GiB) if plan.peak >= GiB else ("MiB", 2 ** 20)
    g = lambda n: f"{n / div:11.2f}"  # noqa: E731
    zero = f"ZeRO stage {plan.zero_stage}" + ("" if plan.sharded else " (one rank: not sharded)")
    rows = [("parameters (fp32 master weights)", plan.params), ("gradients (fp32)", plan.grads),
            ("optimizer state (AdamW, fp32)", plan.optimizer),
            (f"gathered weights ({plan.compute_dtype})", plan.gathered_weights)]
    rows += [("host memory (offloaded state)", plan.host)] if plan.offload else []
    lines = [f"{plan.model}: {f'pp {plan.pp}, ' if plan.pp > 1 else ''}dp {plan.dp}{f' (ep {plan.ep})' if plan.ep > 1 else ''}, {zero}{', optimizer offload' if plan.offload else ''}, micro-batch "
             f"{plan.micro_batch} x {plan.seq_len}{f' / sp {plan.sp}' if plan.sp > 1 else ''} = "
             f"{plan.tokens_per_micro_batch:,} tokens, "
             f"{plan.compute_dtype} compute; {unit} per rank"]
    lines += [f"{name:36}{g(n)}" for name, n in rows]
    lines.append(f"{'train.recompute':36}" + "".join(f"{s:>11}" for s in MODES))
    lines += [f"{name:36}" + "".join(g(values[s]) for s in MODES) for name, values in (
        ("activations", plan.activations), ("logits and loss", dict.fromkeys(MODES, plan.logits)))]
    lines += [f"{'at peak: ' + key:36}" + "".join(g(plan.held[s][key]) for s in MODES)
              for key in plan.held[plan.recompute]]
    lines.append(f"{'peak':36}" + "".join(g(plan.peaks[s]) for s in MODES))
    if gpu_bytes is not None:
        lines.append(f"{f'fits {gpu_bytes / GiB:g} GiB':36}" + "".join(
            f"{'yes' if plan.peaks[s] <= gpu_bytes else 'no':>11}" for s in MODES))
    lines.append("worst moment: " + "; ".join(f"{s} {plan.worst[s]}" for s in MODES))
    if plan.stages:
        lines.append(f"pipeline: {plan.pp} stages, 1F1B over {plan.micro_batches} micro-batches, bubble "
                     f"{100 * plan.bubble:.1f}% of the step; per stage ({unit}, train.recompute={plan.recompute}):")
        lines.append(f"{'stage':>6}{'layers':>9}{'in flight':>10}{'state':>11}{'gradients':>11}{'weights':>11}"
                     f"{'peak':>11}")
        lines += [f"{st['stage']:>6}{'%d-%d' % (st['layers'][0], st['layers'][1] - 1):>9}{st['in_flight']:>10}"
                  f"{g(st['params'] + st['optimizer'])}{g(st['gradients'])}{g(st['gathered_weights'])}"
                  f"{g(st['peaks'][plan.recompute])}" for st in plan.stages]
        lines.append(f"the rows above are stage {max(plan.stages, key=lambda st: st['peaks'][plan.recompute])['stage']}"
                     f", the highest peak")
    return "\n".join(lines)
