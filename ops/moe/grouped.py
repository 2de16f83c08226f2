"""Grouped SwiGLU experts through `torch._grouped_mm`: one GEMM launch per projection for all
experts, no host synchronisation and no Python loop over experts.

Each expert's rows are a segment of x_perm (`offs` = cumulative counts, on the device); the
weights are viewed transposed ([E, D, F] for gate/up, [E, F, D] for down), which is the
column-major second operand the kernel reads without a copy. Runs where torch has the operator
for the device and dtype (`unsupported`): CUDA sm90+ in bfloat16 with row widths that keep the
16-byte alignment its TMA loads need. Counts are trusted (checking their sum would read them on
the host, the sync this path exists to avoid); the reference checks them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["compute_dtype", "grouped_swiglu_grouped_mm", "unsupported"]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts' GEMMs run in: autocast's for x's device where it is on, else x's."""
    kind = x.device.type
    if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def unsupported(x_perm: torch.Tensor, w_gate: torch.Tensor) -> str | None:
    """Why `grouped_swiglu_grouped_mm` cannot run these inputs (None when it can)."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no _grouped_mm"
    if x_perm.device.type == "cuda" and torch.cuda.get_device_capability(x_perm.device) < (9, 0):
        return "torch._grouped_mm needs an sm90+ GPU"
    if compute_dtype(x_perm) != torch.bfloat16:
        return f"torch._grouped_mm runs bfloat16 here, not {compute_dtype(x_perm)}"
    D, Fh = x_perm.shape[-1], w_gate.shape[1]
    if D % 8 or Fh % 8:
        return f"row widths must be multiples of 8 (16 bytes), got hidden {D}, expert size {Fh}"
    return None


def grouped_swiglu_grouped_mm(x_perm: torch.Tensor, counts: torch.Tensor, w_gate: torch.Tensor,
                              w_up: torch.Tensor, w_down: torch.Tensor, hidden_fn=None) -> torch.Tensor:
    """`ops.moe.grouped_swiglu` in three grouped GEMMs (shapes there), in `compute_dtype`: inputs
    and weights are cast as autocast casts them for the per-expert loop's linears."""
    # counts may sit on the host (expert parallelism's dispatcher sizes its all-to-all from them)
    offs = torch.cumsum(counts.to(x_perm.device, non_blocking=True), 0, dtype=torch.int32)
    dt = compute_dtype(x_perm)
    x_perm, w_gate, w_up, w_down = (t.to(dt) for t in (x_perm, w_gate, w_up, w_down))
    gate = torch._grouped_mm(x_perm, w_gate.transpose(-2, -1), offs=offs)
    up = torch._grouped_mm(x_perm, w_up.transpose(-2, -1), offs=offs)
    h = F.silu(gate) * up
    if hidden_fn is not None:
        h = hidden_fn(h)
    return _ContiguousGrad.apply(torch._grouped_mm(h, w_down.transpose(-2, -1), offs=offs))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: _grouped_mm's backward refuses
    the stride-0 gradient of an expanded tensor (y.sum().backward() makes one)."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()
