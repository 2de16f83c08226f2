"""Local mixture-of-experts dispatch: the dispatcher.

``permute`` / ``unpermute`` are index shuffles that run anywhere; ``grouped_swiglu`` picks the
expert-GEMM backend for the device (today the per-expert loop everywhere; a grouped-GEMM kernel
plugs in through ``pick_grouped_swiglu``).
"""

from __future__ import annotations

import torch

from ops.moe.reference import grouped_swiglu_reference, permute, unpermute

__all__ = ["grouped_swiglu", "grouped_swiglu_reference", "permute", "pick_grouped_swiglu",
           "unpermute"]


def pick_grouped_swiglu(x_perm: torch.Tensor):
    """The grouped SwiGLU implementation used for ``x_perm``'s device."""
    return grouped_swiglu_reference


def grouped_swiglu(x_perm: torch.Tensor, counts: torch.Tensor, w_gate: torch.Tensor,
                   w_up: torch.Tensor, w_down: torch.Tensor, hidden_fn=None) -> torch.Tensor:
    """Apply expert e's SwiGLU ``down(h)``, ``h = silu(gate x) * up x``, to its segment of rows.

    x_perm ``[M, D]`` grouped by expert (from ``permute``); counts int ``[E]`` (sum M);
    w_gate, w_up ``[E, F, D]``; w_down ``[E, D, F]``. ``hidden_fn`` (row-wise, e.g. spiking)
    transforms ``h`` ``[m, F]`` before the down projection. Returns ``[M, D]``.
    """
    return pick_grouped_swiglu(x_perm)(x_perm, counts, w_gate, w_up, w_down, hidden_fn=hidden_fn)
