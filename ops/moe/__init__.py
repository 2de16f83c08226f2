"""Local mixture-of-experts dispatch: the dispatcher.

``permute`` / ``unpermute`` are index shuffles that run anywhere; ``grouped_swiglu`` picks the
expert-GEMM backend for the device through ``pick_grouped_swiglu``: on CUDA (sm90+, bfloat16)
three ``torch._grouped_mm`` launches for all experts with no host sync (``grouped.py``),
elsewhere the per-expert loop of the reference.
"""

from __future__ import annotations

import torch

from ops import meta_as_cuda, takes_cuda_path

from ops.moe.grouped import grouped_swiglu_grouped_mm, unsupported as grouped_mm_unsupported
from ops.moe.reference import grouped_swiglu_reference, permute, unpermute

__all__ = ["grouped_swiglu", "grouped_swiglu_grouped_mm", "grouped_swiglu_reference", "meta_as_cuda",
           "permute", "pick_grouped_swiglu", "unpermute"]



def pick_grouped_swiglu(x_perm: torch.Tensor, w_gate: torch.Tensor | None = None):
    """The grouped SwiGLU implementation used for ``x_perm`` (and these expert weights)."""
    if takes_cuda_path(x_perm) and w_gate is not None and grouped_mm_unsupported(x_perm, w_gate) is None:
        return grouped_swiglu_grouped_mm
    return grouped_swiglu_reference


def grouped_swiglu(x_perm: torch.Tensor, counts: torch.Tensor, w_gate: torch.Tensor,
                   w_up: torch.Tensor, w_down: torch.Tensor, hidden_fn=None) -> torch.Tensor:
    """Apply expert e's SwiGLU ``down(h)``, ``h = silu(gate x) * up x``, to its segment of rows.

    x_perm ``[M, D]`` grouped by expert (from ``permute``); counts int ``[E]`` (sum M);
    w_gate, w_up ``[E, F, D]``; w_down ``[E, D, F]``. ``hidden_fn`` (row-wise, e.g. spiking)
    transforms ``h`` ``[m, F]`` before the down projection. Returns ``[M, D]``.
    """
    fn = pick_grouped_swiglu(x_perm, w_gate)
    return fn(x_perm, counts, w_gate, w_up, w_down, hidden_fn=hidden_fn)
