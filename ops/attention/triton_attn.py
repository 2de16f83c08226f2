"""The project's own flash attention in Triton: causal GQA softmax attention with a sliding window,
sink keys and packed documents, forward and backward, one launch per pass for the whole row.

Layout: batch and time flattened to TT = B * T rows; q [TT, HQ, D], k/v [TT, HKV, D], sinks
sk/sv [S, HKV, D]; query head h reads KV head h // G. The masking rules of
`ops.attention.reference` become two int32 arrays over the rows, built once per call on the
device (`row_bounds`):
    lo[i] = max(start of i's document, i - w)    the first key query i sees,
    hi[j] = min(end of j's document - 1, j + w)  the last query that sees key j,
so query i sees key j iff lo[i] <= j <= i, equivalently j <= i <= hi[j]; both arrays rise with
the position. A query tile of rows i0 .. i1 therefore reads the one run of keys lo[i0] .. i1, of
which lo[i1] .. i0 are seen by every row (no mask is applied there); a key tile j0 .. j1 is read
by the queries j0 .. hi[j1], all of them from j1 to hi[j0]. Sinks are S extra keys per KV head,
seen by every query. No [T, T] tensor anywhere: the extra memory is lo, hi and the row-wise
log-sum-exp and o.do [HQ, TT] float32.

Scores run in base 2 (qk_scale = scale * log2 e). Masked scores are -1e30, not -inf: a row whose
first tiles are all masked keeps a finite running maximum, and whatever it summed there is
multiplied by exp2(-1e30 - m) = 0 once its first visible key arrives (every row sees its own key).

Backward (FlashAttention-2 order): o.do per row; dK/dV per key tile summed over the G query heads
of its KV head inside one program (no atomics: the group shares one K/V tile); dQ per query tile;
sink gradients per block of query rows, added atomically into float32 buffers.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ops.triton_util import INTERPRET, autotune, mm

__all__ = ["attention_bwd", "attention_fwd", "attention_triton", "row_bounds", "supports"]

LOG2E = 1.4426950408889634
NEG = tl.constexpr(-1.0e30)  # a masked score (module docstring)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 32, 64, 128)
SINK_ROWS = 256  # query rows per program of the sink-gradient kernel
# Tests set this: every buffer the kernels write starts as NaN, so an element they miss shows up.
NAN_FILL = False
# Under the interpreter (no autotuning) the kernels run with these tile sizes; tests lower them
# to reach multi-tile paths at small T.
INTERPRET_TILES = dict(BM=16, BN=16)


def _configs(settings):
    return [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in settings]


# (BM query rows, BN key rows, warps, stages) per kernel, searched once per (D, G, dtype).
FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3),
                        (128, 64, 8, 4), (128, 128, 8, 3)])
DKDV_CONFIGS = _configs([(64, 128, 8, 2), (32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 3),
                         (64, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 4)])
DQ_CONFIGS = _configs([(128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 3),
                       (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 4)])
KEY = ["D", "G", "S"]


@triton.jit
def _load_rows(base, rows, stride, rd, ok, MASKED: tl.constexpr):
    """[len(rows), D] tile of rows `rows` (row stride `stride`, columns rd) at base; rows not ok
    read 0 where MASKED."""
    ptr = base + rows.to(tl.int64)[:, None] * stride + rd[None, :]
    if MASKED:
        return tl.load(ptr, mask=ok[:, None], other=0.0)
    return tl.load(ptr)


@triton.jit
def _fwd_tile(acc, m_i, l_i, qt, k, v, j0, rm, lo_r, TT, qk_scale, HKV: tl.constexpr, D: tl.constexpr,
              BN: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr):
    """One key tile (rows j0 .. j0 + BN of k and v, already at the KV head) into the running
    softmax of the query tile qt (rows rm, first keys lo_r)."""
    rn = j0 + tl.arange(0, BN)
    rd = tl.arange(0, D)
    kt = _load_rows(k, rn, HKV * D, rd, rn < TT, MASKED)
    vt = _load_rows(v, rn, HKV * D, rd, rn < TT, MASKED)
    s = mm(qt, tl.trans(kt), PREC) * qk_scale
    if MASKED:
        s = tl.where((rn[None, :] >= lo_r[:, None]) & (rn[None, :] <= rm[:, None]), s, NEG)
    return _softmax_step(acc, m_i, l_i, s, vt, PREC)


@triton.jit
def _softmax_step(acc, m_i, l_i, s, vt, PREC: tl.constexpr):
    """The running softmax (acc, max, sum) of a query tile after base-2 scores s against
    values vt."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + mm(p.to(vt.dtype), vt, PREC)
    return acc, m_new, l_i


@triton.jit
def _sink_tile(qt, sk, sv, s0, qk_scale, S: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
               BN: tl.constexpr, PREC: tl.constexpr):
    """Sinks s0 .. s0 + BN: their keys, values and base-2 scores against qt (NEG past S)."""
    rn = s0 + tl.arange(0, BN)
    rd = tl.arange(0, D)
    kt = _load_rows(sk, rn, HKV * D, rd, rn < S, True)
    vt = _load_rows(sv, rn, HKV * D, rd, rn < S, True)
    s = tl.where((rn < S)[None, :], mm(qt, tl.trans(kt), PREC) * qk_scale, NEG)
    return kt, vt, s


@triton.jit
def _query_tile(TT, G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr):
    """This program's query tile (grid: tile, query head) -> first row, head, its KV head, rows
    [BM], columns [D], rows within TT."""
    i0 = tl.program_id(0) * BM
    h = tl.program_id(1)
    rm = i0 + tl.arange(0, BM)
    return i0, h, h // G, rm, tl.arange(0, D), rm < TT


@triton.jit
def _key_runs(lo, i0, TT, BM: tl.constexpr, BN: tl.constexpr):
    """For the query tile at row i0: its first key, key-tile count, and the tiles [n_lo, n_mid)
    seen whole by every row (the others need the mask)."""
    i1 = tl.minimum(i0 + BM, TT) - 1
    k0 = tl.load(lo + i0)
    lo1 = tl.load(lo + i1)
    n = tl.cdiv(i1 + 1 - k0, BN)
    n_lo = tl.minimum(tl.cdiv(tl.maximum(lo1 - k0, 0), BN), n)
    n_mid = tl.maximum(tl.minimum((i0 + 1 - k0) // BN, n), n_lo)
    return k0, n, n_lo, n_mid


@autotune(FWD_CONFIGS, KEY)
@triton.jit
def attn_fwd_kernel(q, k, v, sk, sv, o, lse, lo, TT, qk_scale, HQ: tl.constexpr, HKV: tl.constexpr,
                    G: tl.constexpr, D: tl.constexpr, S: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, PREC: tl.constexpr):
    """o and the base-2 log-sum-exp lse [HQ, TT] for query tile pid 0 of head pid 1."""
    i0, h, hk, rm, rd, row_ok = _query_tile(TT, G, D, BM)
    q += h * D
    k += hk * D
    v += hk * D
    qt = _load_rows(q, rm, HQ * D, rd, row_ok, True)
    lo_r = tl.load(lo + rm, mask=row_ok, other=TT)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, D], dtype=tl.float32)
    if S > 0:
        sk += hk * D
        sv += hk * D
        for s0 in range(0, S, BN):
            _, vt, s = _sink_tile(qt, sk, sv, s0, qk_scale, S, HKV, D, BN, PREC)
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, vt, PREC)
    k0, n, n_lo, n_mid = _key_runs(lo, i0, TT, BM, BN)
    for t in range(0, n_lo):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, qt, k, v, k0 + t * BN, rm, lo_r, TT, qk_scale,
                                  HKV, D, BN, True, PREC)
    for t in range(n_lo, n_mid):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, qt, k, v, k0 + t * BN, rm, lo_r, TT, qk_scale,
                                  HKV, D, BN, False, PREC)
    for t in range(n_mid, n):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, qt, k, v, k0 + t * BN, rm, lo_r, TT, qk_scale,
                                  HKV, D, BN, True, PREC)
    out = acc / l_i[:, None]
    tl.store(o + h * D + rm.to(tl.int64)[:, None] * (HQ * D) + rd[None, :], out.to(o.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(lse + h * TT + rm, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def attn_delta_kernel(o, do, delta, TT, HQ: tl.constexpr, D: tl.constexpr, BM: tl.constexpr):
    """delta [HQ, TT] float32 = sum over D of o * do, for BM rows (pid 0) of head pid 1."""
    h = tl.program_id(1)
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rd = tl.arange(0, D)
    ok = rm < TT
    ot = _load_rows(o + h * D, rm, HQ * D, rd, ok, True).to(tl.float32)
    dot = _load_rows(do + h * D, rm, HQ * D, rd, ok, True).to(tl.float32)
    tl.store(delta + h * TT + rm, tl.sum(ot * dot, 1), mask=ok)


@triton.jit
def _dkdv_tile(dk, dv, kt, vt, q, do, lse, delta, i0, rn, hi_c, TT, qk_scale, HQ: tl.constexpr,
               D: tl.constexpr, BM: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr):
    """Query rows i0 .. i0 + BM of one head (q, do, lse, delta at that head) into the key tile's
    dK (unscaled) and dV; the tile is held transposed, [keys, queries]."""
    rm = i0 + tl.arange(0, BM)
    rd = tl.arange(0, D)
    ok = rm < TT
    qt = _load_rows(q, rm, HQ * D, rd, ok, MASKED)
    dot = _load_rows(do, rm, HQ * D, rd, ok, MASKED)
    if MASKED:
        lse_r = tl.load(lse + rm, mask=ok, other=0.0)
        delta_r = tl.load(delta + rm, mask=ok, other=0.0)
    else:
        lse_r = tl.load(lse + rm)
        delta_r = tl.load(delta + rm)
    pT = tl.exp2(mm(kt, tl.trans(qt), PREC) * qk_scale - lse_r[None, :])
    if MASKED:
        pT = tl.where((rm[None, :] >= rn[:, None]) & (rm[None, :] <= hi_c[:, None]), pT, 0.0)
    dv += mm(pT.to(dot.dtype), dot, PREC)
    dsT = pT * (mm(vt, tl.trans(dot), PREC) - delta_r[None, :])
    dk += mm(dsT.to(qt.dtype), qt, PREC)
    return dk, dv


@autotune(DKDV_CONFIGS, KEY)
@triton.jit
def attn_dkdv_kernel(q, k, v, do, lse, delta, dk, dv, hi, TT, qk_scale, scale, HQ: tl.constexpr,
                     HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, S: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """dK, dV of key tile pid 0 (BN rows) of KV head pid 1, summed over its G query heads."""
    j0 = tl.program_id(0) * BN
    hk = tl.program_id(1)
    rn = j0 + tl.arange(0, BN)
    rd = tl.arange(0, D)
    col_ok = rn < TT
    kt = _load_rows(k + hk * D, rn, HKV * D, rd, col_ok, True)
    vt = _load_rows(v + hk * D, rn, HKV * D, rd, col_ok, True)
    hi_c = tl.load(hi + rn, mask=col_ok, other=-1)  # keys past TT: seen by no query
    j1 = tl.minimum(j0 + BN, TT) - 1
    hi0 = tl.load(hi + j0)
    hi1 = tl.load(hi + j1)
    n = tl.cdiv(hi1 + 1 - j0, BM)
    n_lo = tl.minimum(tl.cdiv(j1 - j0, BM), n)  # tiles holding queries before j1 (causal mask)
    n_mid = tl.maximum(tl.minimum((hi0 + 1 - j0) // BM, n), n_lo)
    dk_acc = tl.zeros([BN, D], dtype=tl.float32)
    dv_acc = tl.zeros([BN, D], dtype=tl.float32)
    for g in range(G):
        h = hk * G + g
        qh = q + h * D
        doh = do + h * D
        lseh = lse + h * TT
        deltah = delta + h * TT
        for t in range(0, n_lo):
            dk_acc, dv_acc = _dkdv_tile(dk_acc, dv_acc, kt, vt, qh, doh, lseh, deltah, j0 + t * BM, rn,
                                        hi_c, TT, qk_scale, HQ, D, BM, True, PREC)
        for t in range(n_lo, n_mid):
            dk_acc, dv_acc = _dkdv_tile(dk_acc, dv_acc, kt, vt, qh, doh, lseh, deltah, j0 + t * BM, rn,
                                        hi_c, TT, qk_scale, HQ, D, BM, False, PREC)
        for t in range(n_mid, n):
            dk_acc, dv_acc = _dkdv_tile(dk_acc, dv_acc, kt, vt, qh, doh, lseh, deltah, j0 + t * BM, rn,
                                        hi_c, TT, qk_scale, HQ, D, BM, True, PREC)
    ptr = hk * D + rn.to(tl.int64)[:, None] * (HKV * D) + rd[None, :]
    tl.store(dk + ptr, (dk_acc * scale).to(dk.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv + ptr, dv_acc.to(dv.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _dq_tile(dq, qt, dot, lse_r, delta_r, k, v, j0, rm, lo_r, TT, qk_scale, HKV: tl.constexpr,
             D: tl.constexpr, BN: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr):
    """Key rows j0 .. j0 + BN (k, v at the KV head) into the query tile's dQ (unscaled)."""
    rn = j0 + tl.arange(0, BN)
    rd = tl.arange(0, D)
    kt = _load_rows(k, rn, HKV * D, rd, rn < TT, MASKED)
    vt = _load_rows(v, rn, HKV * D, rd, rn < TT, MASKED)
    p = tl.exp2(mm(qt, tl.trans(kt), PREC) * qk_scale - lse_r[:, None])
    if MASKED:
        p = tl.where((rn[None, :] >= lo_r[:, None]) & (rn[None, :] <= rm[:, None]), p, 0.0)
    ds = p * (mm(dot, tl.trans(vt), PREC) - delta_r[:, None])
    return dq + mm(ds.to(kt.dtype), kt, PREC)


@autotune(DQ_CONFIGS, KEY)
@triton.jit
def attn_dq_kernel(q, k, v, sk, sv, do, lse, delta, dq, lo, TT, qk_scale, scale, HQ: tl.constexpr,
                   HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, S: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """dQ of query tile pid 0 (BM rows) of head pid 1, from the token keys and the sinks."""
    i0, h, hk, rm, rd, row_ok = _query_tile(TT, G, D, BM)
    qt = _load_rows(q + h * D, rm, HQ * D, rd, row_ok, True)
    dot = _load_rows(do + h * D, rm, HQ * D, rd, row_ok, True)
    lse_r = tl.load(lse + h * TT + rm, mask=row_ok, other=0.0)
    delta_r = tl.load(delta + h * TT + rm, mask=row_ok, other=0.0)
    lo_r = tl.load(lo + rm, mask=row_ok, other=TT)
    k += hk * D
    v += hk * D
    acc = tl.zeros([BM, D], dtype=tl.float32)
    if S > 0:
        for s0 in range(0, S, BN):
            kt, vt, s = _sink_tile(qt, sk + hk * D, sv + hk * D, s0, qk_scale, S, HKV, D, BN, PREC)
            p = tl.exp2(s - lse_r[:, None])
            ds = p * (mm(dot, tl.trans(vt), PREC) - delta_r[:, None])
            acc += mm(ds.to(kt.dtype), kt, PREC)
    k0, n, n_lo, n_mid = _key_runs(lo, i0, TT, BM, BN)
    for t in range(0, n_lo):
        acc = _dq_tile(acc, qt, dot, lse_r, delta_r, k, v, k0 + t * BN, rm, lo_r, TT, qk_scale, HKV,
                       D, BN, True, PREC)
    for t in range(n_lo, n_mid):
        acc = _dq_tile(acc, qt, dot, lse_r, delta_r, k, v, k0 + t * BN, rm, lo_r, TT, qk_scale, HKV,
                       D, BN, False, PREC)
    for t in range(n_mid, n):
        acc = _dq_tile(acc, qt, dot, lse_r, delta_r, k, v, k0 + t * BN, rm, lo_r, TT, qk_scale, HKV,
                       D, BN, True, PREC)
    tl.store(dq + h * D + rm.to(tl.int64)[:, None] * (HQ * D) + rd[None, :],
             (acc * scale).to(dq.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def attn_dsink_kernel(q, sk, sv, do, lse, delta, dsk, dsv, TT, qk_scale, scale, HQ: tl.constexpr,
                      HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, S: tl.constexpr,
                      BM: tl.constexpr, BS: tl.constexpr, ROWS: tl.constexpr, PREC: tl.constexpr):
    """Sink gradients from ROWS query rows (pid 0) of the G heads of KV head pid 1, for sinks
    pid 2 * BS .. + BS, added into dsk/dsv [S, HKV, D] float32."""
    r0 = tl.program_id(0) * ROWS
    hk = tl.program_id(1)
    rs = tl.program_id(2) * BS + tl.arange(0, BS)
    rd = tl.arange(0, D)
    s_ok = rs < S
    kt = _load_rows(sk + hk * D, rs, HKV * D, rd, s_ok, True)
    vt = _load_rows(sv + hk * D, rs, HKV * D, rd, s_ok, True)
    dk_acc = tl.zeros([BS, D], dtype=tl.float32)
    dv_acc = tl.zeros([BS, D], dtype=tl.float32)
    for g in range(G):
        h = hk * G + g
        for i0 in range(r0, r0 + ROWS, BM):
            rm = i0 + tl.arange(0, BM)
            ok = rm < TT
            qt = _load_rows(q + h * D, rm, HQ * D, rd, ok, True)
            dot = _load_rows(do + h * D, rm, HQ * D, rd, ok, True)
            lse_r = tl.load(lse + h * TT + rm, mask=ok, other=0.0)
            delta_r = tl.load(delta + h * TT + rm, mask=ok, other=0.0)
            pT = tl.exp2(mm(kt, tl.trans(qt), PREC) * qk_scale - lse_r[None, :])
            pT = tl.where(s_ok[:, None] & ok[None, :], pT, 0.0)
            dv_acc += mm(pT.to(dot.dtype), dot, PREC)
            dsT = pT * (mm(vt, tl.trans(dot), PREC) - delta_r[None, :])
            dk_acc += mm(dsT.to(qt.dtype), qt, PREC)
    ptr = hk * D + rs[:, None] * (HKV * D) + rd[None, :]
    tl.atomic_add(dsk + ptr, dk_acc * scale, mask=s_ok[:, None])
    tl.atomic_add(dsv + ptr, dv_acc, mask=s_ok[:, None])


def supports(q: torch.Tensor, num_sinks: int = 0) -> bool:
    """Whether `attention_triton` runs q [B, T, Hq, D] with num_sinks sinks (device, dtype, head
    size, row count within int32)."""
    on_device = q.device.type == "cpu" if INTERPRET else q.is_cuda
    B, T, Hq, D = q.shape
    return (on_device and q.dtype in DTYPES and D in HEAD_DIMS and B * T * max(Hq, 1) < 2 ** 31
            and B * T > 0 and num_sinks < 2 ** 16)


def row_bounds(cu: torch.Tensor, TT: int, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """cu [N+1] int64 document bounds over the TT rows (device) -> lo [TT], hi [TT] int32 (the
    module docstring's first key of each query and last query of each key)."""
    pos = torch.arange(TT, device=cu.device)
    doc = torch.searchsorted(cu, pos, right=True) - 1  # empty documents own no row
    lo, hi = cu[doc], cu[doc + 1] - 1
    if window is not None:
        lo, hi = torch.maximum(lo, pos - window), torch.minimum(hi, pos + window)
    return lo.to(torch.int32), hi.to(torch.int32)


def _new(shape, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if NAN_FILL:
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)
    return torch.empty(shape, device=like.device, dtype=dtype)


def _launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args); under the interpreter with the tile sizes a config would set."""
    if INTERPRET:
        kwargs = {**{k: v for k, v in INTERPRET_TILES.items() if k in kernel.arg_names}, **kwargs}
    kernel[grid](*args, **kwargs)


def _grid(n_rows: int, name: str, heads: int):
    """(tiles along the rows for tile meta-parameter `name`, heads): a function of the config on
    a GPU (autotuned), fixed under the interpreter."""
    if INTERPRET:
        return (triton.cdiv(n_rows, INTERPRET_TILES[name]), heads)
    return lambda meta: (triton.cdiv(n_rows, meta[name]), heads)


def _meta(q, k, sk):
    Hq, D, Hkv = q.shape[1], q.shape[2], k.shape[1]
    # float32 runs three TF32 products per dot (close to float32 accuracy, on tensor cores)
    return dict(HQ=Hq, HKV=Hkv, G=Hq // Hkv, D=D, S=0 if sk is None else sk.shape[0],
                PREC="tf32x3" if q.dtype == torch.float32 else "tf32")


def _sinks_or(sk, sv, k, v):
    """The sink tensors the kernels read (k and v stand in, unread, when there are none)."""
    return (sk, sv) if sk is not None else (k, v)


# Forward and backward are torch.library operators: selective recomputation keeps the forward's
# output by its name (parallel/recompute.py), the memory planner runs the fake implementations on
# meta tensors, and torch.compile takes each call as one node instead of tracing the launches.
@torch.library.custom_op("spikingbrain::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sk: Optional[torch.Tensor],
                  sv: Optional[torch.Tensor], lo: torch.Tensor, hi: torch.Tensor,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [TT, Hq, D], k, v [TT, Hkv, D], sinks [S, Hkv, D] or None, lo, hi [TT] int32, scale)
    -> o [TT, Hq, D], base-2 log-sum-exp [Hq, TT] float32."""
    TT = q.shape[0]
    m = _meta(q, k, sk)
    o = _new(q.shape, q, q.dtype)
    lse = _new((m["HQ"], TT), q, torch.float32)
    _launch(attn_fwd_kernel, _grid(TT, "BM", m["HQ"]), q, k, v, *_sinks_or(sk, sv, k, v), o, lse, lo,
            TT, scale * LOG2E, **m)
    return o, lse


@attention_fwd.register_fake
def _(q, k, v, sk, sv, lo, hi, scale):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("spikingbrain::attention_bwd", mutates_args=())
def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  sk: Optional[torch.Tensor], sv: Optional[torch.Tensor], o: torch.Tensor,
                  lse: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scale: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dq, dk, dv like q, k, v; dsk, dsv like the sinks ([0] without sinks)."""
    TT, m = q.shape[0], _meta(q, k, sk)
    do = do.contiguous()
    delta = _new((m["HQ"], TT), q, torch.float32)
    _launch(attn_delta_kernel, (triton.cdiv(TT, 64), m["HQ"]), o, do, delta, TT, HQ=m["HQ"], D=m["D"],
            BM=64)
    dq, dk, dv = _new(q.shape, q, q.dtype), _new(k.shape, k, k.dtype), _new(v.shape, v, v.dtype)
    _launch(attn_dkdv_kernel, _grid(TT, "BN", m["HKV"]), q, k, v, do, lse, delta, dk, dv, hi, TT,
            scale * LOG2E, scale, **m)
    _launch(attn_dq_kernel, _grid(TT, "BM", m["HQ"]), q, k, v, *_sinks_or(sk, sv, k, v), do, lse, delta,
            dq, lo, TT, scale * LOG2E, scale, **m)
    if sk is None:
        return dq, dk, dv, q.new_empty(0), q.new_empty(0)
    dsk = torch.zeros(sk.shape, device=sk.device, dtype=torch.float32)
    dsv = torch.zeros(sv.shape, device=sv.device, dtype=torch.float32)
    bs = min(64, triton.next_power_of_2(m["S"]))
    bm = INTERPRET_TILES["BM"] if INTERPRET else 64
    rows = 2 * bm if INTERPRET else SINK_ROWS
    grid = (triton.cdiv(TT, rows), m["HKV"], triton.cdiv(m["S"], bs))
    _launch(attn_dsink_kernel, grid, q, sk, sv, do, lse, delta, dsk, dsv, TT, scale * LOG2E, scale,
            BM=bm, BS=bs, ROWS=rows, **m)
    return dq, dk, dv, dsk.to(sk.dtype), dsv.to(sv.dtype)


@attention_bwd.register_fake
def _(do, q, k, v, sk, sv, o, lse, lo, hi, scale):
    sinks = (sk.new_empty(sk.shape), sv.new_empty(sv.shape)) if sk is not None else (q.new_empty(0),) * 2
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), *sinks


def _setup_context(ctx, inputs, output):
    q, k, v, sk, sv, lo, hi, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, sk, sv, o, lse, lo, hi)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, sk, sv, o, lse, lo, hi = ctx.saved_tensors
    dq, dk, dv, dsk, dsv = attention_bwd(do, q, k, v, sk, sv, o, lse, lo, hi, ctx.scale)
    if sk is None:
        dsk = dsv = None
    return dq, dk, dv, dsk, dsv, None, None, None


torch.library.register_autograd("spikingbrain::attention_fwd", _backward, setup_context=_setup_context)


def attention_triton(q, k, v, *, window=None, sink_k=None, sink_v=None, cu_seqlens=None,
                     scale=None) -> torch.Tensor:
    """``ops.attention.attention`` on the project's Triton kernels (call `supports` first).

    q ``[B, T, Hq, D]``; k, v ``[B, T, Hkv, D]``; sink_k, sink_v ``[S, Hkv, D]``; cu_seqlens
    int ``[N+1]`` (B == 1) or None (each row one sequence). Inputs are assumed already checked.
    Returns ``[B, T, Hq, D]`` in q's dtype.
    """
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    TT = B * T
    if cu_seqlens is None:
        cu = torch.arange(0, TT + 1, T, device=q.device, dtype=torch.int64)
    else:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int64)
    lo, hi = row_bounds(cu, TT, window)
    scale = D ** -0.5 if scale is None else float(scale)
    sk = sink_k.contiguous() if sink_k is not None else None
    sv = sink_v.contiguous() if sink_v is not None else None
    out, _ = attention_fwd(q.reshape(TT, Hq, D).contiguous(), k.reshape(TT, Hkv, D).contiguous(),
                           v.reshape(TT, Hkv, D).contiguous(), sk, sv, lo, hi, scale)
    return out.view(B, T, Hq, D)
