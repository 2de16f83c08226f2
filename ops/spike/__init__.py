"""Adaptive-threshold spike quantisation (SpikingBrain's spiking activations).

`spike_quantize` picks an implementation per call: the fused Triton kernel (`triton_kernel`) for
CUDA tensors (and CPU tensors when TRITON_INTERPRET=1 was set before import), the pure-PyTorch
reference (`reference`) otherwise. Both follow the rules in `ops.spike.reference`. The choice is
made inside one torch.library operator (`spikingbrain::spike_quantize`, straight-through
gradient), so torch.compile's regions take a spiked input without a graph break.
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


# One operator for torch.compile: dynamo records the call as a single node of the graph (no break
# at the spiked inputs of a compiled region) and AOT autograd takes its fake and backward formulas
# from the registrations below, so neither the Triton launch nor the choice of implementation is
# traced. An operator returns tensors only: the outputs a call did not ask for are empty ([0]).
@torch.library.custom_op("spikingbrain::spike_quantize", mutates_args=())
def _spike_op(x: torch.Tensor, k: float, v_min: float, v_max: float, want_counts: bool,
              want_stats: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., D] -> out [..., D] (x's dtype), counts [..., D] int32 ([0] unless want_counts),
    v_th [..., 1] float32, stats int64 [4] ([0] unless want_stats); all contiguous."""
    # Contiguous outputs whatever x's layout (the Triton path copies x to rows anyway): a compiled
    # graph lays out the op's outputs as the fake implementation says.
    x = x.contiguous()
    if _use_triton(x):
        out, counts, v_th, stats = triton_kernel.spike_quantize_triton(
            x, k, v_min, v_max, want_counts=want_counts, want_stats=want_stats)
    else:
        out, counts_f, v_th = spike_quantize_reference(x, k, v_min, v_max)
        counts = counts_f.to(torch.int32) if want_counts else None
        stats = spike_stats_reference(counts_f) if want_stats else None
    if counts is None:
        counts = x.new_empty(0, dtype=torch.int32)
    if stats is None:
        stats = x.new_empty(0, dtype=torch.int64)
    return out, counts, v_th, stats


@_spike_op.register_fake
def _(x, k, v_min, v_max, want_counts, want_stats):
    # Also the op's meta kernel: the memory planner replays steps on meta tensors.
    return (x.new_empty(x.shape), x.new_empty(x.shape if want_counts else (0,), dtype=torch.int32),
            x.new_empty((*x.shape[:-1], 1), dtype=torch.float32),
            x.new_empty(4 if want_stats else 0, dtype=torch.int64))


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])  # counts, v_th, stats


def _backward(ctx, grad_out, *unused):
    """Straight-through: d out / d x is the identity."""
    return grad_out, None, None, None, None, None


torch.library.register_autograd("spikingbrain::spike_quantize", _backward, setup_context=_setup_context)


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
    out, counts, v_th, summary = _spike_op(x, float(k), float(v_min), float(v_max),
                                           bool(return_counts), bool(stats))
    if not (return_counts or stats):
        return out
    return SpikeResult(out, counts, v_th if return_counts else None,
                       dict(zip(STAT_NAMES, summary.unbind())) if stats else None)
