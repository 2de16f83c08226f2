"""The LM-head loss as the decoder first computed it: full logits, fp32 cross-entropy.

Ground truth for `ops.loss.linear_cross_entropy`: it holds the whole [N, V] logits in the compute
dtype, their fp32 copy and the gradient of both, which is what the chunked op avoids.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy_reference(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                                   ignore_index: int = -100) -> torch.Tensor:
    """h [N, D], weight [V, D], targets [N] int64 -> summed cross-entropy over the targets that are
    not `ignore_index` (fp32 0-dim). The matmul follows autocast when it is on."""
    logits = F.linear(h, weight)
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")
