"""Adaptive-threshold spike quantisation, pure PyTorch (the semantics every implementation matches).

Per token (row over the last dim): V_th = clamp(mean(|x|) / k, v_min, v_max), computed in float32
as sum(|x|) / (D * k) (one rounded division); counts s = round(x / V_th) (half to even); output
s * V_th rounded once to x's dtype.
"""
import torch

STAT_NAMES = ("numel", "zeros", "abs_sum", "le7")


def spike_quantize_reference(x: torch.Tensor, k: float, v_min: float, v_max: float
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., D] -> out [..., D] in x's dtype, counts [..., D] float32 (integral), v_th [..., 1] float32."""
    xf = x.float()
    total = xf.abs().sum(-1, keepdim=True)
    # Same-shape tensor divisor: a Python-scalar divisor lets CUDA multiply by its reciprocal instead.
    v_th = (total / torch.full_like(total, x.shape[-1] * k)).clamp(v_min, v_max)
    counts = torch.round(xf / v_th)
    return (counts * v_th).to(x.dtype), counts, v_th


def spike_stats_reference(counts: torch.Tensor) -> torch.Tensor:
    """counts [..., D] -> int64 [4]: numel, number of zeros, sum |s|, number with |s| <= 7."""
    a = counts.abs()
    return torch.stack([torch.tensor(counts.numel(), device=counts.device),
                        (a == 0).sum(), a.to(torch.int64).sum(), (a <= 7).sum()])
