"""Adaptive-threshold spike quantisation (SpikingBrain's spiking activations).

`spike_quantize` picks an implementation per call: the fused Triton kernel (`triton_kernel`) for
CUDA tensors (and CPU tensors when TRITON_INTERPRET=1 was set before import), the pure-PyTorch
reference (`reference`) otherwise. Both follow the rules in `ops.spike.reference`.
"""
from typing import NamedTuple

import torch

from .reference import STAT_NAMES, spike_quantize_reference, spike_stats_reference

try:
    from . import triton_kernel
except ImportError:  # no triton on this machine: the reference handles every device
    triton_kernel = None

__all__ = ["SpikeResult", "spike_quantize"]


class SpikeResult(NamedTuple):
    """out [..., D] (x's dtype); counts [..., D] int32 and v_th [..., 1] float32 when
    return_counts, else None; stats (dict of int64 0-dim tensors, see `spike_quantize`) or None."""
    out: torch.Tensor
    counts: torch.Tensor | None
    v_th: torch.Tensor | None
    stats: dict[str, torch.Tensor] | None


def _use_triton(x: torch.Tensor) -> bool:
    return triton_kernel is not None and triton_kernel.supports(x)


class _SpikeSTE(torch.autograd.Function):
    """Spike forward, straight-through backward (d out / d x = identity)."""

    @staticmethod
    def forward(ctx, x, k, v_min, v_max, want_counts, want_stats):
        if _use_triton(x):
            out, counts, v_th, stats = triton_kernel.spike_quantize_triton(
                x, k, v_min, v_max, want_counts=want_counts, want_stats=want_stats)
        else:
            out, counts_f, v_th = spike_quantize_reference(x, k, v_min, v_max)
            counts = counts_f.to(torch.int32) if want_counts else None
            stats = spike_stats_reference(counts_f) if want_stats else None
        extras = [t for t in (counts, v_th, stats) if t is not None]
        ctx.mark_non_differentiable(*extras)
        return out, counts, v_th, stats

    @staticmethod
    def backward(ctx, grad_out, *unused):
        return grad_out, None, None, None, None, None


# Outside torch.compile's regions (a graph break at each spiked input): on torch 2.11 dynamo
# fails to trace the autograd function around the Triton launch (mark_non_differentiable of its
# extra outputs, symbolic sizes under MoE); the kernel is one fused pass either way.
@torch.compiler.disable
def spike_quantize(x: torch.Tensor, k: float = 3.0, *, v_min: float = 1e-5, v_max: float = 1e4,
                   return_counts: bool = False, stats: bool = False):
    """Quantise activations to integer spike counts times a per-token threshold.

    x [..., D], any float dtype. Per row: V_th = clamp(mean(|x|) / k, v_min, v_max) in float32,
    s = round(x / V_th) (half to even), output s * V_th in x's dtype. Gradient: straight-through.
    Counts are exact as long as |s| fits in int32 (always, unless the v_max clamp is active).

    Returns the output tensor alone, or a `SpikeResult` when return_counts or stats is set.
    stats: int64 0-dim tensors (no host sync) "numel", "zeros" (s == 0), "abs_sum" (sum |s|),
    "le7" (|s| <= 7).
    """
    out, counts, v_th, summary = _SpikeSTE.apply(x, float(k), float(v_min), float(v_max),
                                                 return_counts, stats)
    if not (return_counts or stats):
        return out
    return SpikeResult(out, counts, v_th if return_counts else None,
                       dict(zip(STAT_NAMES, summary.unbind())) if stats else None)
