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


def _policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_policy)


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
