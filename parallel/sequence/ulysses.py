"""Ulysses sequence parallelism for softmax attention: all-to-all from time slices to head groups.

Each SP rank holds a contiguous time slice of every row ([1, B * T_l, H, D], row b at
[b * T_l, (b + 1) * T_l)). One all-to-all gives every rank the full rows for a share of the
heads ([1, B * T, H / sp, D], row b at [b * T, (b + 1) * T), its tokens in rank order), where
ordinary single-device attention runs with the global document boundaries; a second all-to-all
brings the outputs back to the time slices. Both all-to-alls are differentiable, so the backward
is two more all-to-alls of the gradients.

Head distribution with GQA (Hq query heads, Hkv KV heads, G = Hq / Hkv; `ulysses_layout`):
  * Hkv % sp == 0: rank r gets KV heads [r * Hkv / sp, (r + 1) * Hkv / sp) and their query groups;
  * sp % Hkv == 0 (more ranks than KV heads): each KV head is replicated to R = sp / Hkv ranks and
    its query group is split among them; when G % R != 0 every group is padded with zero query
    heads to Gp = ceil(G / R) * R, whose outputs are dropped (SpikingBrain-7B, Hq 28 / Hkv 4 at
    sp 8: R = 2, groups of 7 padded to 8, 4 of 32 query heads wasted);
  * anything else raises (`parallel.sp` must divide or be a multiple of the KV heads).
Why pad and replicate rather than split heads unevenly: every rank then runs one plain GQA call
of the same shape (no ragged all-to-all, no load imbalance beyond the padding), and the costs are
explicit: the padded query heads cost attention compute (Gp / G) and all-to-all volume; the
replicated KV heads cost all-to-all volume only (R copies of K/V leave each rank).

Sinks [S, Hkv, D] are replicated parameters: each rank slices the (replicated) KV heads it owns,
so a sink's gradient on one rank only covers its heads and its tokens; like every replicated
parameter under SP, the gradients are summed over the SP group by the data-parallel engine.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ops.attention import attention
from parallel import comm

__all__ = ["UlyssesLayout", "ulysses_attention", "ulysses_layout", "ulysses_volume"]


class UlyssesLayout(NamedTuple):
    """How `q_heads` query / `kv_heads` KV heads spread over `sp` ranks (see the module doc)."""
    sp: int
    group: int          # G = Hq / Hkv, query heads per KV head
    replicas: int       # R: ranks sharing one KV head (1 when Hkv % sp == 0)
    padded_group: int   # Gp >= G: query heads per KV head after zero padding (a multiple of R)
    q_per_rank: int     # query heads each rank attends with (padded ones included)
    kv_per_rank: int    # KV heads each rank holds (replicas included)


def ulysses_layout(q_heads: int, kv_heads: int, sp: int) -> UlyssesLayout:
    """The head distribution for Ulysses; ValueError when `parallel.sp` fits neither rule."""
    if kv_heads <= 0 or q_heads % kv_heads != 0:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of KV heads ({kv_heads})")
    G = q_heads // kv_heads
    if kv_heads % sp == 0:
        return UlyssesLayout(sp, G, 1, G, q_heads // sp, kv_heads // sp)
    if sp % kv_heads == 0:
        R = sp // kv_heads
        Gp = -(-G // R) * R
        return UlyssesLayout(sp, G, R, Gp, Gp // R, 1)
    raise ValueError(f"parallel.sp={sp} must divide the KV heads or be a multiple of them for "
                     f"Ulysses attention; got {q_heads} query / {kv_heads} KV heads "
                     f"(use an sp that divides {kv_heads} or is a multiple of it, or "
                     f"parallel.sp_softmax=halo for window layers)")


def ulysses_volume(*, rows: int, slice_len: int, q_heads: int, kv_heads: int, head_dim: int,
                   sp: int, element_size: int = 2) -> int:
    """Bytes one rank sends per layer in the forward for Ulysses (the backward sends as many).

    Out: q, k, v in the padded / replicated layout; back: the outputs; 1 / sp of each stays local.
    """
    if sp == 1:
        return 0
    lay = ulysses_layout(q_heads, kv_heads, sp)
    heads = sp * (2 * lay.q_per_rank + 2 * lay.kv_per_rank)  # q + o, k + v, all ranks' shares
    return rows * slice_len * heads * head_dim * element_size * (sp - 1) // sp


def _to_heads(x: torch.Tensor, sp: int) -> torch.Tensor:
    """[N, sp * h, D] in rank-major head order -> [sp, N, h, D]: piece i goes to rank i."""
    N, H, D = x.shape
    return x.reshape(N, sp, H // sp, D).transpose(0, 1)



def local_shapes(name: str, q, k, v, rows: int, group):
    """Checks a rank's q [1, B*T_l, Hq, D], k/v [1, B*T_l, Hkv, D] of B = `rows` rows ->
    (N = B*T_l, Hq, Hkv, D, T_l, sp group size, this rank's index in the group)."""
    if q.dim() != 4 or q.shape[0] != 1 or k.shape[:2] != q.shape[:2] or v.shape != k.shape:
        raise ValueError(f"{name} takes q [1, B*T_l, Hq, D], k/v [1, B*T_l, Hkv, D]; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    _, N, Hq, D = q.shape
    if rows <= 0 or N % rows != 0:
        raise ValueError(f"{N} local tokens do not split into rows={rows} equal slices")
    sp = comm.group_size(group)
    rank = 0 if sp == 1 else torch.distributed.get_rank(group)  # the rank within the group
    return N, Hq, k.shape[2], D, N // rows, sp, rank

def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int | None,
                      sink_k: torch.Tensor | None, sink_v: torch.Tensor | None,
                      scale: float | None, global_cu_seqlens: torch.Tensor | None, rows: int,
                      group) -> torch.Tensor:
    """Causal GQA softmax attention over rows split along time across the SP `group`.

    q [1, B * T_l, Hq, D]; k, v [1, B * T_l, Hkv, D]: this rank's slice of each of the B = `rows`
    rows. sink_k, sink_v [S, Hkv, D] or None (the full parameters, on every rank). window: int
    or None, in global positions. global_cu_seqlens int [M+1] over the B * T tokens of the
    unsplit rows (row b at [b * T, (b + 1) * T), every row start a boundary) or None (one
    document per row). Returns o [1, B * T_l, Hq, D]: equal to `ops.attention.attention` over
    the unsplit rows, restricted to this rank's slice.
    """
    N, Hq, Hkv, D, T_l, sp, rank = local_shapes("ulysses_attention", q, k, v, rows, group)
    lay = ulysses_layout(Hq, Hkv, sp)
    q, k, v = q[0], k[0], v[0]  # [N, H, D]
    if lay.padded_group != lay.group:  # zero query heads at the end of each group, dropped below
        q = q.reshape(N, Hkv, lay.group, D)
        q = torch.cat([q, q.new_zeros(N, Hkv, lay.padded_group - lay.group, D)], dim=2)
        q = q.reshape(N, Hkv * lay.padded_group, D)
    if lay.replicas > 1:  # KV head j -> ranks j*R ... j*R + R - 1, next to its query share
        k = k.repeat_interleave(lay.replicas, dim=1)
        v = v.repeat_interleave(lay.replicas, dim=1)
        if sink_k is not None:
            sink_k = sink_k.repeat_interleave(lay.replicas, dim=1)
            sink_v = sink_v.repeat_interleave(lay.replicas, dim=1)
    if sink_k is not None:
        heads = slice(rank * lay.kv_per_rank, (rank + 1) * lay.kv_per_rank)
        sink_k, sink_v = sink_k[:, heads], sink_v[:, heads]

    # One all-to-all for q, k and v together: [sp, N, hq + 2 hkv, D], piece i -> rank i; the
    # result's piece p is rank p's time slice of every row, for this rank's heads.
    hq, hkv = lay.q_per_rank, lay.kv_per_rank
    packed = torch.cat([_to_heads(q, sp), _to_heads(k, sp), _to_heads(v, sp)], dim=2)
    packed = comm.all_to_all(packed.contiguous(), group=group)
    # [sp, B, T_l, h, D] -> [B, sp, T_l, h, D]: row b's full sequence, slices in rank order
    full = packed.reshape(sp, rows, T_l, hq + 2 * hkv, D).transpose(0, 1)
    fq, fk, fv = full.split([hq, hkv, hkv], dim=3)
    T = sp * T_l
    if global_cu_seqlens is None:  # one document per row: the batched dense path
        shape = (rows, T)
        cu = None
    else:
        shape = (1, rows * T)
        cu = global_cu_seqlens
    fq, fk, fv = (t.reshape(*shape, t.shape[-2], D) for t in (fq, fk, fv))
    o = attention(fq, fk, fv, window=window, sink_k=sink_k, sink_v=sink_v, cu_seqlens=cu,
                  scale=scale)
    # back: [B, sp, T_l, hq, D] -> [sp, N, hq, D], piece p (rank p's time slice) -> rank p
    o = o.reshape(rows, sp, T_l, hq, D).transpose(0, 1).reshape(sp, N, hq, D)
    o = comm.all_to_all(o.contiguous(), group=group)  # piece i: rank i's heads of our slice
    o = o.permute(1, 0, 2, 3).reshape(N, Hkv, lay.padded_group, D)[:, :, :lay.group]
    return o.reshape(1, N, Hq, D)
