"""Local mixture-of-experts dispatch in plain PyTorch: permute, grouped SwiGLU, unpermute.

Expert weights are stacked like ``nn.Linear`` weights: ``w_gate [E, F, D]``, ``w_up [E, F, D]``,
``w_down [E, D, F]``; expert e computes ``down_e(silu(gate_e x) * up_e x)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def permute(x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int):
    """Group the ``N * k`` (token, slot) copies of x by expert.

    x ``[N, D]``; topk_idx int ``[N, k]``. Returns ``x_perm [N*k, D]`` (rows sorted by expert
    ascending, stable in (token, slot) order within an expert), ``counts [E]`` int64 (rows per
    expert) and ``order [N*k]`` int64 (``order[i]`` is the flat ``token * k + slot`` of row i).
    """
    if x.dim() != 2 or topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0]:
        raise ValueError(f"x must be [N, D] and topk_idx [N, k]; got {tuple(x.shape)} and "
                         f"{tuple(topk_idx.shape)}")
    if topk_idx.dtype.is_floating_point or topk_idx.dtype == torch.bool:
        raise ValueError(f"topk_idx must be an integer tensor; got {topk_idx.dtype}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int; got {num_experts!r}")
    if topk_idx.device != x.device:
        raise ValueError("x and topk_idx must be on the same device")
    k = topk_idx.shape[1]
    flat = topk_idx.reshape(-1).to(torch.int64)
    # on GPU a range check would stall the stream; out-of-range indices fail in scatter_add_
    if flat.device.type == "cpu" and flat.numel() and (flat.min() < 0 or flat.max() >= num_experts):
        raise ValueError(f"topk_idx values must lie in [0, num_experts={num_experts})")
    order = torch.argsort(flat, stable=True)
    # scatter_add_ rather than bincount: bincount's output size depends on the data (a sync)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    return x.index_select(0, order // k), counts, order


def unpermute(y_perm: torch.Tensor, order: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
    """Undo ``permute`` and combine each token's k expert outputs.

    y_perm ``[N*k, D]``; order int64 ``[N*k]`` from ``permute``; topk_weight ``[N, k]``.
    Returns ``y [N, D]`` with ``y[n] = sum_j topk_weight[n, j] * y_perm[row of (n, j)]``,
    weighted in the wider of the two dtypes and returned in y_perm's dtype.
    """
    if topk_weight.dim() != 2:
        raise ValueError(f"topk_weight must be [N, k]; got {tuple(topk_weight.shape)}")
    N, k = topk_weight.shape
    if y_perm.dim() != 2 or y_perm.shape[0] != N * k or order.shape != (N * k,):
        raise ValueError(f"y_perm must be [N*k={N * k}, D] and order [N*k]; got "
                         f"{tuple(y_perm.shape)} and {tuple(order.shape)}")
    # index_copy scatters forward and gathers backward: no accumulation, deterministic
    y_flat = torch.zeros_like(y_perm).index_copy(0, order, y_perm)
    dtype = torch.promote_types(y_perm.dtype, topk_weight.dtype)
    y_flat = y_flat.view(N, k, y_perm.shape[1]).to(dtype)
    y = (y_flat * topk_weight.to(dtype).unsqueeze(-1)).sum(dim=1)
    return y.to(y_perm.dtype)


def check_expert_weights(x_perm, counts, w_gate, w_up, w_down) -> None:
    """Raise ValueError unless shapes match ``grouped_swiglu``'s contract."""
    if w_gate.dim() != 3 or w_up.shape != w_gate.shape:
        raise ValueError(f"w_gate and w_up must both be [E, F, D]; got {tuple(w_gate.shape)} "
                         f"and {tuple(w_up.shape)}")
    E, Fdim, D = w_gate.shape
    if w_down.shape != (E, D, Fdim):
        raise ValueError(f"w_down must be [E={E}, D={D}, F={Fdim}]; got {tuple(w_down.shape)}")
    if x_perm.dim() != 2 or x_perm.shape[1] != D:
        raise ValueError(f"x_perm must be [M, D={D}]; got {tuple(x_perm.shape)}")
    if not (x_perm.dtype == w_gate.dtype == w_up.dtype == w_down.dtype):
        raise ValueError(f"x_perm and expert weights must share a dtype; got {x_perm.dtype}, "
                         f"{w_gate.dtype}, {w_up.dtype}, {w_down.dtype}")
    if counts.shape != (E,):
        raise ValueError(f"counts must be [E={E}]; got {tuple(counts.shape)}")


def grouped_swiglu_reference(x_perm: torch.Tensor, counts: torch.Tensor, w_gate: torch.Tensor,
                             w_up: torch.Tensor, w_down: torch.Tensor, hidden_fn=None) -> torch.Tensor:
    """Apply expert e's SwiGLU to its segment of rows, one expert at a time.

    x_perm ``[M, D]`` grouped by expert; counts int ``[E]`` rows per expert (sum M);
    w_gate, w_up ``[E, F, D]``; w_down ``[E, D, F]``. Returns ``[M, D]``.
    Unused experts get zero weight gradients. ``hidden_fn`` (row-wise) transforms the hidden
    activations ``[m, F]`` before the down projection.
    """
    check_expert_weights(x_perm, counts, w_gate, w_up, w_down)
    sizes = counts.tolist()  # the one host sync of the call
    if sum(sizes) != x_perm.shape[0] or min(sizes) < 0:
        raise ValueError(f"counts must be non-negative and sum to x_perm's rows "
                         f"({x_perm.shape[0]}); got {sizes}")
    if x_perm.shape[0] == 0:
        # no rows at all: run expert 0 on nothing so the weights stay in the graph
        return _swiglu(x_perm, w_gate[0], w_up[0], w_down[0], hidden_fn)
    segments = torch.split(x_perm, sizes)
    outs = [_swiglu(seg, w_gate[e], w_up[e], w_down[e], hidden_fn)
            for e, seg in enumerate(segments) if seg.shape[0]]
    return torch.cat(outs)


def _swiglu(x, w_gate, w_up, w_down, hidden_fn=None):
    h = F.silu(F.linear(x, w_gate)) * F.linear(x, w_up)
    return F.linear(h if hidden_fn is None else hidden_fn(h), w_down)
