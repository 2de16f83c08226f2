"""Cases for the SP linear-attention tests and what their gloo ranks run (importable by spawned
processes).

A case is a packed batch of B rows x T tokens, flattened as [1, B*T, H, D] with row b at
[b*T, (b+1)*T), whose documents cross the SP slice boundaries of sp 2 and sp 4 (T_l = 24, 12).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel.sequence.lasp2 import sp_linear_attention

T, HQ, HKV, DK, DV = 48, 4, 2, 16, 16
# Document starts per row. Row 0: a 1-token document at the sp-2 boundary (24) and at the sp-4
# boundary (12), a document ending exactly at 24, one with 1 token past 36 (the next slice's
# whole continuing part); row 1: a document over four sp-4 slices, a 1-token one at the row end;
# row 2: a document ending inside a continuing sp-4 slice (24..36) whose successor continues
# into the next one (the chain resets there); row 3: one document over the whole row.
DOC_STARTS = [[0, 5, 12, 13, 23, 24, 25, 37], [0, 3, 47], [0, 30], [0]]
DECAYS = ("weak", "strong")
METHODS = ("lasp2", "allscan")


def global_cu_seqlens() -> torch.Tensor:
    """[M+1] int32 over the B*T tokens."""
    bounds = [b * T + s for b, starts in enumerate(DOC_STARTS) for s in starts]
    return torch.tensor(bounds + [len(DOC_STARTS) * T], dtype=torch.int32)


def make_inputs(decay: str, seed: int = 0) -> dict:
    """Full-batch q, k, v, g and an output cotangent do (float32, CPU)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(DOC_STARTS) * T

    def randn(*shape):
        return torch.randn(1, n, *shape, generator=gen)

    q, k, v, do = randn(HQ, DK), randn(HKV, DK), randn(HKV, DV), randn(HQ, DV)
    # weak: ~-0.04 per step, the state lives through the whole row; strong: ~-6 per step, it dies
    # within a few tokens (a slice's total decay underflows to 0 in float32).
    g = F.logsigmoid(randn(HKV, DK)) / 16 if decay == "weak" else F.logsigmoid(2 * randn(HKV, DK) - 6)
    return dict(q=q, k=k, v=v, g=g, do=do)


def local_slice(x: torch.Tensor, rank: int, sp: int) -> torch.Tensor:
    """[1, B*T, ...] -> this rank's [1, B*T_l, ...]: tokens [rank*T_l, (rank+1)*T_l) of every row."""
    rows, t_l = len(DOC_STARTS), T // sp
    return x.reshape(rows, T, *x.shape[2:])[:, rank * t_l:(rank + 1) * t_l].reshape(1, rows * t_l,
                                                                                    *x.shape[2:])


def local_layout(rank: int, sp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(local_cu_seqlens [N+1] int32, continues [B] bool) of SP rank `rank` of `sp`."""
    t_l = T // sp
    lo, hi = rank * t_l, (rank + 1) * t_l
    bounds, continues = [], []
    for b, starts in enumerate(DOC_STARTS):
        bounds += [b * t_l] + [b * t_l + s - lo for s in starts if lo < s < hi]
        continues.append(lo not in starts)
    return (torch.tensor(bounds + [len(DOC_STARTS) * t_l], dtype=torch.int32),
            torch.tensor(continues, dtype=torch.bool))


def rank_forward_backward(inputs: dict, rank: int, sp: int, method: str, group) -> dict:
    """This rank's output and the gradients of its q, k, v, g slices under the cotangent do."""
    leaves = {name: local_slice(inputs[name], rank, sp).requires_grad_() for name in "qkvg"}
    cu, continues = local_layout(rank, sp)
    o = sp_linear_attention(*leaves.values(), scale=DK ** -0.5, local_cu_seqlens=cu,
                            continues=continues, group=group, method=method)
    o.backward(local_slice(inputs["do"], rank, sp))
    return {"o": o.detach(), **{name: x.grad for name, x in leaves.items()}}


def sp_ranks(_payload=None) -> dict:
    """On each gloo rank: {(method, decay): rank_forward_backward(...)} for every case."""
    dist.init_process_group("gloo")
    rank, sp = dist.get_rank(), dist.get_world_size()
    return {(method, decay): rank_forward_backward(make_inputs(decay), rank, sp, method, dist.group.WORLD)
            for method in METHODS for decay in DECAYS}
