"""Gated linear attention over sequence-parallel slices: LASP-2 and the all-scan.

Each SP rank holds a contiguous time slice of every row. GLA's state recurrence
    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,    o_t = scale * q_t S_t      (ops/gla/reference.py)
is linear in the entering state, so a rank can run the chunked kernel from a zero state and add
the contribution of the true entering state afterwards:
    o_t += scale * (q_t * exp(G_t)) @ h_in,    G_t = sum_{slice start <= i <= t} g_i (inclusive),
for t in the row's first local document, when that document began on an earlier rank. h_in, the
state at the end of the previous ranks' part of the row, chains across ranks as
h_{r+1} = d_r * h_r + s_r with s_r the final state of the row's last local document and d_r the
slice's total decay (zero where a document starts inside the slice: the chain resets there).
`parallel.comm.linear_prefix` computes that chain: LASP-2 all-gathers (s, d) and combines locally,
the ZeCO-style all-scan passes it along a ring. Everything is plain autograd, so gradients reach
q, k, v and g on every rank (the prefix's backward carries the state gradients back).

The per-rank pieces (`local_pass`, `add_incoming`) are separate so a test can drive simulated
ranks in one process.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ops.gla import chunk_gla
from parallel import comm

__all__ = ["sp_linear_attention", "local_pass", "add_incoming", "LocalPass"]
PREFIX_METHODS = {"lasp2": "gather", "allscan": "ring"}


@dataclass
class LocalPass:
    """One rank's zero-state GLA over its B row slices of T_l tokens.

    o [1, B*T_l, Hq, V] (q's dtype), s [B, Hkv, K, V] float32 (final state of each row's last local
    document), d [B, Hkv, K, 1] float32 (what the slice multiplies an entering state by, 0 where
    the chain resets), first_doc [B, T_l] bool (tokens an entering state reaches: the row's first
    local document, only where `continues`)."""
    o: torch.Tensor
    s: torch.Tensor
    d: torch.Tensor
    first_doc: torch.Tensor


def _check(q, k, v, g, local_cu_seqlens, continues, method) -> tuple[int, int]:
    """Raise ValueError naming the problem; return (B rows, T_l slice length)."""
    if method not in PREFIX_METHODS:
        raise ValueError(f"parallel.sp_linear must be lasp2 or allscan, got {method!r}")
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g)):
        if x.dim() != 4 or x.shape[0] != 1:
            raise ValueError(f"sp_linear_attention: {name} must be [1, B*T_l, H, D] (rows flattened "
                             f"along time), got shape {tuple(x.shape)}")
    if not (k.shape[1] == v.shape[1] == g.shape[1] == q.shape[1]):
        raise ValueError(f"sp_linear_attention: q, k, v, g must share the token count, got "
                         f"{q.shape[1]}, {k.shape[1]}, {v.shape[1]}, {g.shape[1]}")
    if continues.dim() != 1 or continues.dtype != torch.bool or continues.numel() == 0:
        raise ValueError(f"sp_linear_attention: continues must be a non-empty 1-D bool tensor [B], "
                         f"got {continues.dtype} shape {tuple(continues.shape)}")
    rows, tokens = continues.shape[0], q.shape[1]
    if tokens % rows:
        raise ValueError(f"sp_linear_attention: {tokens} local tokens do not split into "
                         f"continues.shape[0]={rows} rows of equal length")
    slice_len = tokens // rows
    cu = local_cu_seqlens
    if cu.dim() != 1 or cu.numel() < 2 or cu.is_floating_point():
        raise ValueError(f"sp_linear_attention: local_cu_seqlens must be a 1-D integer tensor [N+1], "
                         f"got {cu.dtype} shape {tuple(cu.shape)}")
    if cu.device.type == "cpu":  # on an accelerator the check would cost a host sync per layer
        bounds = cu.tolist()
        if bounds[0] != 0 or bounds[-1] != tokens or any(a > b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"sp_linear_attention: local_cu_seqlens must rise from 0 to the "
                             f"{tokens} local tokens, got {bounds}")
        missing = sorted(set(range(0, tokens, slice_len)) - set(bounds))
        if missing:
            raise ValueError(f"sp_linear_attention: every row start must be a boundary in "
                             f"local_cu_seqlens (rows of {slice_len} tokens); missing {missing}")
    return rows, slice_len


def local_pass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *, scale: float,
               local_cu_seqlens: torch.Tensor, continues: torch.Tensor, rows: int) -> LocalPass:
    """Zero-state chunked GLA of this rank's slices plus what the cross-rank chain needs.

    q [1, B*T_l, Hq, K], k/g [1, B*T_l, Hkv, K], v [1, B*T_l, Hkv, V], local_cu_seqlens [N+1]
    (every row start a boundary), continues [B] bool, rows = B."""
    o, final = chunk_gla(q, k, v, g, scale=scale, cu_seqlens=local_cu_seqlens, output_final_state=True)
    tokens, hkv, dk = g.shape[1:]
    slice_len = tokens // rows
    cu = local_cu_seqlens.to(device=q.device, dtype=torch.long)
    starts = torch.arange(rows, device=q.device) * slice_len
    # Leftmost boundary at each row end: the document just before it is the row's last non-empty one.
    last_doc = torch.searchsorted(cu, starts + slice_len) - 1
    # First boundary after each row start: the end of the row's first non-empty document.
    first_len = cu[torch.searchsorted(cu, starts, right=True)] - starts
    cont = continues.to(q.device)
    s = final[last_doc].float()                                          # [B, Hkv, K, V]
    passes = cont & (first_len == slice_len)                             # one continuing document
    total = g.float().reshape(rows, slice_len, hkv, dk).sum(dim=1)       # [B, Hkv, K]
    d = torch.where(passes[:, None, None], total.exp(), 0.0)[..., None]  # [B, Hkv, K, 1]
    pos = torch.arange(slice_len, device=q.device)
    first_doc = cont[:, None] & (pos[None, :] < first_len[:, None])      # [B, T_l]
    return LocalPass(o=o, s=s, d=d, first_doc=first_doc)


def add_incoming(part: LocalPass, q: torch.Tensor, g: torch.Tensor, h_in: torch.Tensor, *,
                 scale: float) -> torch.Tensor:
    """The local output with the entering states' contribution: o [1, B*T_l, Hq, V] in q's dtype.

    q [1, B*T_l, Hq, K], g [1, B*T_l, Hkv, K], h_in [B, Hkv, K, V] float32 (state entering each
    row's slice; used only where `part.first_doc`)."""
    rows, slice_len = part.first_doc.shape
    _, _, hq, dk = q.shape
    hkv, dv = h_in.shape[1], h_in.shape[3]
    # Inclusive cumsum from the slice start: the reference applies exp(g_t) before o_t reads S_t.
    # G <= 0, so exp never overflows; beyond the first document the masked values stay finite.
    decay_in = g.float().reshape(rows, slice_len, hkv, dk).cumsum(dim=1).exp()
    qg = q.float().reshape(rows, slice_len, hkv, hq // hkv, dk) * scale  # head h = kv * G + j
    extra = torch.einsum("btzgk,btzk,bzkv->btzgv", qg, decay_in, h_in.float())
    extra = extra * part.first_doc[:, :, None, None, None]
    return (part.o.float() + extra.reshape(1, rows * slice_len, hq, dv)).to(q.dtype)


def sp_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *,
                        scale: float | None, local_cu_seqlens: torch.Tensor, continues: torch.Tensor,
                        group=None, method: str = "lasp2") -> torch.Tensor:
    """GLA over sequence-parallel slices, equal to `ops.gla.chunk_gla` over the unsplit rows.

    q [1, B*T_l, Hq, K], k/g [1, B*T_l, Hkv, K] (g <= 0 log-decay), v [1, B*T_l, Hkv, V], with row
    b's local slice at [b*T_l, (b+1)*T_l); local_cu_seqlens [N+1] int (every local document
    boundary and every row start); continues [B] bool (row b's slice starts inside a document
    begun on an earlier rank); group: the SP process group (None: a world of one); method
    "lasp2" (all-gather of the states) or "allscan" (ring) -> o [1, B*T_l, Hq, V] in q's dtype.
    scale None means K ** -0.5, as in chunk_gla.
    """
    rows, _ = _check(q, k, v, g, local_cu_seqlens, continues, method)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    part = local_pass(q, k, v, g, scale=scale, local_cu_seqlens=local_cu_seqlens, continues=continues,
                      rows=rows)
    h_in = comm.linear_prefix(part.s, part.d, method=PREFIX_METHODS[method], group=group)
    return add_incoming(part, q, g, h_in, scale=scale)
