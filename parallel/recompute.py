"""Activation recomputation (`train.recompute`), applied to the decoder's blocks.

- `full`: each block keeps only its input; its whole forward runs again during backward.
- `selective`: each block keeps the outputs of its matrix multiplies (projections, experts,
  attention cores), the expensive part, and recomputes everything else (norms, activations,
  gates, RoPE, elementwise ops), which is cheap in FLOPs but a large share of the saved bytes.

Either way the numbers are unchanged: the same ops run on the same inputs (no dropout in these
models). The block's `forward` is replaced in place, so parameter names (and so checkpoints)
stay the same with and without recomputation.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
# the two dispatch modes selective checkpointing is made of (private, stable since torch 2.4)
from torch.utils.checkpoint import _CachedTorchDispatchMode, _CachingTorchDispatchMode

MODES = ("none", "full", "selective")

_aten = torch.ops.aten
_SAVED_OPS = {op for op in (
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
    getattr(_aten, "_scaled_mm", None) and _aten._scaled_mm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._flash_attention_forward.default, _aten._efficient_attention_forward.default,
) if op is not None}
try:  # flash varlen attention (ops.attention's CUDA path for windows and packed documents)
    import torch.nn.attention.varlen  # noqa: F401  registers torch_attn::_varlen_attn
    _SAVED_OPS.add(torch.ops.torch_attn._varlen_attn.default)
except (ImportError, AttributeError):  # a torch without varlen_attn: ops.attention does not use it
    pass
try:  # the project's Triton attention (ops.attention's CUDA path for windows, sinks, documents)
    import ops.attention.triton_attn  # noqa: F401  registers spikingbrain::attention_fwd
    _SAVED_OPS.add(torch.ops.spikingbrain.attention_fwd.default)
except ImportError:  # no triton: ops.attention does not use it
    pass


def _policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _passing_profiler_ops(mode: type) -> type:
    """`mode` (one of selective checkpointing's two dispatch modes) letting profiler annotations
    through uncounted."""
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "profiler":
            return func(*args, **(kwargs or {}))
        return mode.__torch_dispatch__(self, func, types, args, kwargs)
    return type(f"{mode.__name__}PassingProfiler", (mode,), {"__torch_dispatch__": __torch_dispatch__})


_CACHING = _passing_profiler_ops(_CachingTorchDispatchMode)
_CACHED = _passing_profiler_ops(_CachedTorchDispatchMode)


def _selective_contexts():
    """The caching (forward) and cached (recompute) modes of `create_selective_checkpoint_contexts`,
    except that profiler annotations pass through uncounted: a nested FSDP2 unit inside a block
    (the experts under expert parallelism) annotates its hooks a different number of times in
    the forward and in the recomputation, which shifts the replay counters of torch >= 2.13
    (known upstream for FSDP + EP models). The modes keep their own state and construction
    (which differ between torch versions); only their class gains the pass-through."""
    caching, cached = create_selective_checkpoint_contexts(_policy)
    caching.__class__, cached.__class__ = _CACHING, _CACHED
    return caching, cached


def apply_recompute(blocks, mode: str) -> None:
    """Wraps each module of `blocks` (the decoder's `layers`) for recomputation `mode`."""
    if mode not in MODES:
        raise ValueError(f"train.recompute must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "none":
        return
    extra = {"context_fn": _selective_contexts} if mode == "selective" else {}
    for block in blocks:
        block.forward = functools.partial(_recomputed, block.forward, extra)


def _recomputed(forward, extra, *args, **kwargs):
    if not torch.is_grad_enabled():  # evaluation: nothing is saved anyway
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)
