"""Window-halo sequence parallelism for sliding-window softmax attention.

Each SP rank holds a contiguous time slice of every row ([1, B * T_l, H, D]). A query at global
position i with window w sees keys i - w ... i (and the sinks), so rank p needs, besides its own
keys, the keys/values of up to w positions just before its slice: the halo. It then runs ordinary
single-device attention on [halo + local] per row and keeps the local queries' outputs.

The exchange: `comm.shift` by 1, 2, ..., n = min(ceil(w / T_l), sp - 1) ranks; hop j carries the
last min(T_l, w - (j - 1) T_l) tokens of K and V (one tensor) of every row from rank p - j to p,
so every rank receives H = min(w, (sp - 1) T_l) tokens per row: the least possible volume (an
all-gather of every rank's last w tokens would send sp - 1 times more), in n point-to-point
rounds; n is 1 whenever the window fits in a slice (SpikingBrain at 32k-128k on sp <= 8).
shift's backward sends the halo gradients back to the ranks that own those keys/values. Every
rank keeps all H received tokens, also the zeros shift returns from ranks before 0: the shapes
and the autograd graph are then the same on every rank, so every rank takes part in every
shift's backward (a rank that dropped its unused halo would skip that collective and hang the
others). The zeros sit before the row start, which is a document boundary, so nothing sees them.

Why [halo + local] with clipped documents is exact. The local row covers global positions
[p T_l - H, (p + 1) T_l); its first real position is a = max(0, p T_l - H), and every document
boundary at or before the window start becomes a start there (boundaries inside stay where they
are). Take a local query i >= p T_l in a document starting at s >= 0. Globally it sees keys
j in [max(s, i - w), i] plus the sinks; locally [max(s, a, i - w), i] (a document cut at the
window start only raises s to a start <= a). And max(s, i - w) >= a: either H = w and
i - w >= p T_l - w = p T_l - H, or H = (sp - 1) T_l >= p T_l and a = 0 <= s. So the key sets
agree; the sinks are visible to every query in both (they depend on no position or document);
the softmax runs over the same scores, hence the same outputs. When w >= H + T_l - 1
`ops.attention` drops the window (full causal over the local row): the same set again, every
local key being within the window. The halo positions get zero queries whose outputs are dropped:
their output gradient is zero, so they add nothing to any gradient (only compute: H / (H + T_l)
of a row's queries are wasted).
"""
from __future__ import annotations

import weakref

import torch

from ops.attention import attention
from parallel import comm
from .ulysses import local_shapes

__all__ = ["halo_attention", "halo_hops", "halo_volume"]


def halo_hops(window: int, slice_len: int, sp: int) -> list[int]:
    """Tokens per row that hop j = 1, 2, ... carries (from rank p - j to p): sums to the halo."""
    hops, left = [], window
    while left > 0 and len(hops) < sp - 1:
        hops.append(min(slice_len, left))
        left -= slice_len
    return hops


def halo_volume(*, rows: int, slice_len: int, window: int, kv_heads: int, head_dim: int, sp: int,
                element_size: int = 2) -> int:
    """Bytes the busiest rank sends per layer in the forward (the backward returns as many).

    K and V of min(window, (sp - 1) * slice_len) tokens of every row (rank 0 sends every hop).
    """
    return rows * sum(halo_hops(window, slice_len, sp)) * 2 * kv_heads * head_dim * element_size


def _halo_cu_seqlens(cu: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """int32 [B * (M+2)]: the documents of global `cu` [M+1] seen through B windows of `length`
    tokens starting at global `starts` [B] (may be negative), laid end to end. Each window
    starts with a boundary of its own; boundaries outside a window clamp to its ends (empty
    documents, which own no position). Device ops only, no host read."""
    local = (cu.to(torch.int64)[None, :] - starts[:, None]).clamp(0, length)
    local = torch.cat([local.new_zeros(starts.numel(), 1), local], dim=1)
    offsets = torch.arange(starts.numel(), device=cu.device, dtype=torch.int64) * length
    return (local + offsets[:, None]).reshape(-1).to(torch.int32)



# The boundaries of the last few (global cu_seqlens, layout) pairs: every window layer of a step
# sees the same ones, so they are built once a step, and the attention backends that read them
# to the host (varlen's longest document) meet the same tensor each layer.
_RECENT = 4
_recent_windows: list[tuple] = []


def _window_boundaries(global_cu: torch.Tensor | None, rows: int, T: int, first: int, L: int,
                       device: torch.device) -> torch.Tensor:
    """int32 boundaries of the B = `rows` windows of L tokens starting at global position `first`
    of each row (rows of T tokens), from the global documents (`global_cu` [M+1] or None: one
    document per row)."""
    key = (rows, T, first, L, device, None if global_cu is None else global_cu._version)
    for ref, k, cu in _recent_windows:
        if k == key and (ref is None if global_cu is None else ref is not None and ref() is global_cu):
            return cu
    # Row starts join the boundaries (the contract has them already; the zeros before a row's
    # position 0, on ranks p with p T_l < H, rely on them): sorted, duplicates are empty documents
    row_starts = torch.arange(rows + 1, dtype=torch.int64, device=device) * T
    cu = row_starts if global_cu is None else torch.cat([global_cu.to(torch.int64), row_starts]).sort().values
    cu = _halo_cu_seqlens(cu, torch.arange(rows, device=device) * T + first, L)
    _recent_windows.insert(0, (None if global_cu is None else weakref.ref(global_cu), key, cu))
    del _recent_windows[_RECENT:]
    return cu

def halo_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int,
                   sink_k: torch.Tensor | None, sink_v: torch.Tensor | None,
                   scale: float | None, global_cu_seqlens: torch.Tensor | None, rows: int,
                   group) -> torch.Tensor:
    """Causal GQA sliding-window attention over rows split along time across the SP `group`.

    q [1, B * T_l, Hq, D]; k, v [1, B * T_l, Hkv, D]: this rank's slice of each of the B = `rows`
    rows. window: int w (query i sees keys i - w ... i). sink_k, sink_v [S, Hkv, D] or None (the
    full parameters, on every rank). global_cu_seqlens int [M+1] over the B * T tokens of the
    unsplit rows (row b at [b * T, (b + 1) * T)) or None (one document per row). Returns
    o [1, B * T_l, Hq, D]: equal to `ops.attention.attention` over the unsplit rows, restricted
    to this rank's slice.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"halo_attention needs a non-negative int window (parallel.sp_softmax="
                         f"halo is for sliding-window layers; full attention takes ulysses); "
                         f"got window={window!r}")
    N, Hq, Hkv, D, T_l, sp, rank = local_shapes("halo_attention", q, k, v, rows, group)
    qr = q.reshape(rows, T_l, Hq, D)
    kv = torch.cat([k, v], dim=2).reshape(rows, T_l, 2 * Hkv, D)  # one shift per hop for both

    # hop j brings rank p - j's last `need` tokens (zeros where p - j < 0), earliest hop first.
    # Every rank keeps all it received in the graph, the zeros included, so that every rank runs
    # every shift's backward (a collective); the zeros are masked as a document of their own.
    pieces = [comm.shift(kv[:, T_l - need:].contiguous(), offset=j, group=group)
              for j, need in enumerate(halo_hops(window, T_l, sp), start=1)]
    H = sum(p.shape[1] for p in pieces)  # min(window, (sp - 1) T_l) >= this rank's real halo
    if H:
        kv = torch.cat(pieces[::-1] + [kv], dim=1)
        qr = torch.cat([qr.new_zeros(rows, H, Hq, D), qr], dim=1)
    L = H + T_l
    kr, vr = kv.split([Hkv, Hkv], dim=2)
    T = sp * T_l
    cu = _window_boundaries(global_cu_seqlens, rows, T, rank * T_l - H, L, q.device)
    o = attention(qr.reshape(1, rows * L, Hq, D), kr.reshape(1, rows * L, Hkv, D),
                  vr.reshape(1, rows * L, Hkv, D), window=window, sink_k=sink_k, sink_v=sink_v,
                  cu_seqlens=cu, scale=scale)
    return o.reshape(rows, L, Hq, D)[:, H:].reshape(1, N, Hq, D)
