"""Triton forward kernels of chunked GLA, GQA-native: one program serves a whole query-head group.

Shapes (all contiguous, batch and time flattened to TT = B * T rows):
    q [TT, HQ, K], k/g [TT, HKV, K], v [TT, HKV, V], o [TT, HQ, V], query head hk * G + j reads
    KV head hk. Chunks of BT = 64 rows never cross a document; `tab` [NC, 4] int32 holds per
    chunk (first row, valid rows, document, is-last-of-document), `doc_off` [N+1] the first chunk
    of every document. gc [NC, HKV, BT, K] float32 is the within-chunk inclusive cumsum of g;
    rows past a chunk's end repeat its last value (g = 0 there), so every exponent formed from gc
    below is <= 0 without masking. States hs [NC, HKV, K, V] (q's dtype) enter each chunk.

Inside a chunk, rows are handled per sub-chunk a of BC = 16 rows with the G query heads stacked
as R = BC * GP rows (row r: time r // GP, head r % GP; GP = next power of two >= G). Keys of
earlier sub-chunks b < a are matched through the reference r_a = gc at the row before a:
(q * exp(gc - r_a)) . (k * exp(r_a - gc)), both exponents <= 0.

The diagonal block (keys of sub-chunk a itself) has two forms, chosen per program and sub-chunk
from its decay span, span_a = max over the channels of r_a - gc at a's last row (>= 0):
- span_a <= SPAN_MAX (the usual case: the 7B gate logsigmoid(x) / 16 spans 40 over 16 tokens
  only where its logits stay below about -40): the same factorisation through r_a, where now the key factors
  exp(r_a - gc_j) are >= 1 but at most exp(SPAN_MAX), and the query factors at least
  exp(-SPAN_MAX): no overflow or underflow, each product rounded as in the off-diagonal blocks,
  and the whole block is one tensor-core dot with a causal mask.
- otherwise (a channel all but closes within 16 tokens, as the 76B's key-tied gate can): the
  decay exp(gc_i - gc_j), j <= i, is built as a running product of exp(g) row by row (E below),
  exact to a few ulps whatever the decay, at the cost of a loop over the 16 query rows.
"""
import triton
import triton.language as tl

from ops.triton_util import INTERPRET, UPCAST_DOTS, autotuned, mm  # noqa: F401 (re-exported)

BT = 64  # rows per chunk; the backward's per-sub-chunk accumulators assume BT // BC == 4
BC = 16  # rows per sub-chunk (the smallest tl.dot side)
# Largest decay span of a sub-chunk whose diagonal block takes the factorised dot (module
# docstring): exp(40) ~ 2e17 is far inside float32's and bfloat16's range. Tests lower it to -1
# to run the row-by-row form everywhere.
SPAN_MAX = 40.0


CHUNK_SETTINGS = [(8, 1), (8, 2)]  # 4 warps spill at K = V = 128, G = 7 (sm_90)
STATE_SETTINGS = [(2, 3), (4, 3)]


@triton.jit
def chunk_info(tab, c):
    """-> first row (int64), valid rows, document, is-last-chunk-of-its-document for chunk c."""
    t0 = tl.load(tab + c * 4).to(tl.int64)
    return t0, tl.load(tab + c * 4 + 1), tl.load(tab + c * 4 + 2), tl.load(tab + c * 4 + 3)


@triton.jit
def row_live(idx, L, n: tl.constexpr):
    """[n] copies of idx < L (a vector: the interpreter mishandles vector & scalar masks)."""
    return (tl.zeros([n], dtype=tl.int32) + idx) < L


@triton.jit
def diagonal_row(E, g, s0, i, L, cols, rc, rg, HQ: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr,
                 G: tl.constexpr, n: tl.constexpr, GPP: tl.constexpr):
    """Step i of a diagonal sub-chunk block (rows s0 .. s0 + BC of the chunk, channels `cols` [n]):
    E [BC, n] grown from step i - 1 to E[j] = exp(gc_i - gc_j) for j <= i (1 at j = i; rows past
    i are overwritten later), and query row i of the group's heads: its rows of a [TT * HQ, .]
    view [GPP] and their mask [GPP, 1]."""
    gi = tl.load(g + (s0 + i) * (HKV * K) + cols, mask=row_live(s0 + i, L, n), other=0.0)
    E = tl.where((rc == i)[:, None], 1.0, E * tl.exp(gi.to(tl.float32))[None, :])
    qrow = (s0 + i) * HQ + rg
    return E, qrow, ((rg < G) & row_live(s0 + i, L, GPP))[:, None]


@triton.jit
def stacked_rows(s0: tl.constexpr, L, HQ: tl.constexpr, G: tl.constexpr, BC: tl.constexpr,
                 GP: tl.constexpr):
    """Rows of the sub-chunk starting at chunk row s0 with the group's heads stacked:
    -> (time, head) row [R] relative to the chunk's first row and group's first head (times HQ
    plus head, for a [T * HQ, D] view), chunk row [R], valid [R]."""
    r = tl.arange(0, BC * GP)
    i = r // GP
    j = r % GP
    return (s0 + i) * HQ + j, s0 + i, (s0 + i < L) & (j < G)


@triton.jit
def reference_row(gcc, s0: tl.constexpr, kq, K: tl.constexpr):
    """r_a = gc at the row before the sub-chunk starting at chunk row s0 (0 for the first), for
    channels kq [BK]."""
    if s0 == 0:
        ra = tl.zeros(kq.shape, dtype=tl.float32)
    else:
        ra = tl.load(gcc + (s0 - 1) * K + kq)
    return ra


@triton.jit
def sub_factor(gcc, s0: tl.constexpr, crow, kq, K: tl.constexpr):
    """Query-side factors of the sub-chunk starting at chunk row s0, for channels kq [BK]:
    r_a [BK] and F = exp(gc_i - r_a) [R, BK] for the stacked rows `crow` (chunk rows); both
    exponents are <= 0."""
    ra = reference_row(gcc, s0, kq, K)
    F = tl.exp(tl.load(gcc + crow[:, None] * K + kq[None, :]) - ra[None, :])
    return ra, F


@triton.jit
def diagonal_span(gcc, s0: tl.constexpr, ra, kq, K: tl.constexpr, BC: tl.constexpr):
    """-> (gc of the sub-chunk's rows [BC, len(kq)], its decay span: the largest r_a - gc over
    those rows and channels, a scalar >= 0)."""
    ga = tl.load(gcc + (s0 + tl.arange(0, BC))[:, None] * K + kq[None, :])
    return ga, tl.max(tl.max(ra[None, :] - ga, axis=1), axis=0)


@triton.jit
def causal(crow, s0: tl.constexpr, BC: tl.constexpr):
    """[R, BC] mask of the diagonal block: stacked query row (chunk row crow) sees key s0 + j."""
    return crow[:, None] >= (s0 + tl.arange(0, BC))[None, :]


@triton.jit
def cumsum_kernel(g, gc, tab, HKV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr):
    """gc[c, hk] = inclusive cumsum over the chunk's rows of g (float32); grid (NC, HKV)."""
    c = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1)
    t0, L, _, _ = chunk_info(tab, c)
    if L == 0:
        return
    rt = tl.arange(0, BT)
    kk = tl.arange(0, K)
    x = tl.load(g + t0 * HKV * K + hk * K + rt[:, None] * (HKV * K) + kk[None, :],
                mask=(rt < L)[:, None], other=0.0)
    tl.store(gc + (c * HKV + hk) * BT * K + rt[:, None] * K + kk[None, :],
             tl.cumsum(x.to(tl.float32), axis=0))


@autotuned(STATE_SETTINGS, key=["K", "V"])
@triton.jit
def fwd_state_kernel(k, v, gc, h0, hs, ht, cu, doc_off, HKV: tl.constexpr, K: tl.constexpr,
                     V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
                     HAS_H0: tl.constexpr, PREC: tl.constexpr):
    """Walk one document's chunks in order for a [BK, BV] block of one KV head's state: store the
    state entering each chunk to hs, the final one (float32) to ht [N, HKV, K, V].
    h0 [N, HKV, K, V] optional. Grid (K/BK * V/BV, HKV, N)."""
    kb = tl.program_id(0) // (V // BV)
    vb = tl.program_id(0) % (V // BV)
    hk = tl.program_id(1)
    n = tl.program_id(2)
    rk = kb * BK + tl.arange(0, BK)
    rv = vb * BV + tl.arange(0, BV)
    rt = tl.arange(0, BT)
    bos = tl.load(cu + n).to(tl.int64)
    eos = tl.load(cu + n + 1).to(tl.int64)
    c0 = tl.load(doc_off + n).to(tl.int64)
    c1 = tl.load(doc_off + n + 1).to(tl.int64)
    st = ((n * HKV + hk) * K + rk[:, None]) * V + rv[None, :]
    if HAS_H0:
        h = tl.load(h0 + st).to(tl.float32)
    else:
        h = tl.zeros([BK, BV], dtype=tl.float32)
    kv = rk[:, None] * V + rv[None, :]
    for i in range(c1 - c0):
        c = c0 + i
        t0 = bos + i * BT
        live = (t0 + rt < eos)[:, None]
        tl.store(hs + (c * HKV + hk) * K * V + kv, h.to(hs.dtype.element_ty))
        kt = tl.load(k + t0 * HKV * K + hk * K + rt[:, None] * (HKV * K) + rk[None, :], mask=live,
                     other=0.0)
        vt = tl.load(v + t0 * HKV * V + hk * V + rt[:, None] * (HKV * V) + rv[None, :], mask=live,
                     other=0.0)
        gcc = gc + (c * HKV + hk) * BT * K
        gt = tl.load(gcc + rt[:, None] * K + rk[None, :])
        gl = tl.load(gcc + (BT - 1) * K + rk)
        kd = (kt.to(tl.float32) * tl.exp(gl[None, :] - gt)).to(kt.dtype)
        h = h * tl.exp(gl)[:, None] + mm(tl.trans(kd), vt, PREC)
    tl.store(ht + st, h)


@autotuned(CHUNK_SETTINGS, key=["K", "V", "G"])
@triton.jit
def fwd_o_kernel(q, k, v, g, gc, hs, o, sA, tab, scale, HQ: tl.constexpr, HKV: tl.constexpr,
                 G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                 BT: tl.constexpr, BC: tl.constexpr, GP: tl.constexpr, GPP: tl.constexpr,
                 PREC: tl.constexpr, SPAN: tl.constexpr):
    """o for one chunk and all G query heads of KV head hk; grid (NC, HKV).

    sA [TT, HQ, BC] (q's dtype) is scratch for the row-by-row diagonal blocks of A: they are made
    one query row at a time (heads as the rows of a [GPP, BC] dot, GPP = max(16, GP)) and read
    back stacked as [R, BC] for one dot with v. The stacked query tiles go through K in blocks of
    BK columns, which keeps their float32 factors within the registers.
    """
    c = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1)
    t0, L, _, _ = chunk_info(tab, c)
    if L == 0:
        return
    # Scalar 64-bit bases at the chunk's first row (and the group's first head); int32 offsets.
    q += t0 * HQ * K + hk * G * K
    o += t0 * HQ * V + hk * G * V
    sA += t0 * HQ * BC + hk * G * BC
    k += t0 * HKV * K + hk * K
    g += t0 * HKV * K + hk * K
    v += t0 * HKV * V + hk * V
    hs += (c * HKV + hk) * K * V
    gc += (c * HKV + hk) * BT * K
    dt = q.dtype.element_ty
    kk = tl.arange(0, K)
    vv = tl.arange(0, V)
    rt = tl.arange(0, BT)
    rc = tl.arange(0, BC)
    rg = tl.arange(0, GPP)
    for a in tl.static_range(BT // BC):
        s0 = a * BC
        if s0 < L:
            row, crow, ok = stacked_rows(s0, L, HQ, G, BC, GP)
            span = diagonal_span(gc, s0, reference_row(gc, s0, kk, K), kk, K, BC)[1]
            fast = span <= SPAN
            if fast:  # the diagonal block joins the dot below (module docstring)
                acc = tl.zeros([BC * GP, V], dtype=tl.float32)
            else:  # diagonal block first, E[j] = exp(gc_i - gc_j) for j <= i grown row by row
                sub_ok = s0 + rc < L
                ka = tl.load(k + (s0 + rc)[:, None] * (HKV * K) + kk[None, :], mask=sub_ok[:, None],
                             other=0.0).to(tl.float32)
                E = tl.zeros([BC, K], dtype=tl.float32)
                for i in range(BC):
                    E, qrow, head_ok = diagonal_row(E, g, s0, i, L, kk, rc, rg, HQ, HKV, K, G, K, GPP)
                    qi = tl.load(q + qrow[:, None] * K + kk[None, :], mask=head_ok, other=0.0)
                    Ai = mm(qi, tl.trans((ka * E).to(dt)), PREC) * scale
                    tl.store(sA + qrow[:, None] * BC + rc[None, :], Ai.to(dt), mask=head_ok)
                tl.debug_barrier()  # the rows just stored are read back by other threads
                Ad = tl.load(sA + row[:, None] * BC + rc[None, :], mask=ok[:, None], other=0.0)
                va = tl.load(v + (s0 + rc)[:, None] * (HKV * V) + vv[None, :], mask=sub_ok[:, None],
                             other=0.0)
                acc = mm(Ad, va, PREC)
            # Keys before `lim` through the reference r_a: the earlier sub-chunks, and a's own
            # rows on the fast path.
            lim = tl.where(fast, s0 + BC, s0)
            key_ok = (rt < lim) & (rt < L)
            A = tl.zeros([BC * GP, BT], dtype=tl.float32)
            for kb in tl.static_range(K // BK):
                kq = kb * BK + tl.arange(0, BK)
                q2 = tl.load(q + row[:, None] * K + kq[None, :], mask=ok[:, None], other=0.0)
                ra, F = sub_factor(gc, s0, crow, kq, K)
                qf = q2.to(tl.float32) * F
                # Entering state, read through the decay from the chunk start: exp(gc) = F exp(r_a).
                h = tl.load(hs + kq[:, None] * V + vv[None, :])
                acc += mm((qf * (tl.exp(ra) * scale)[None, :]).to(dt), h, PREC)
                kc = tl.load(k + rt[:, None] * (HKV * K) + kq[None, :], mask=key_ok[:, None],
                             other=0.0).to(tl.float32)
                gk = tl.load(gc + rt[:, None] * K + kq[None, :])
                kr = kc * tl.exp(tl.where(key_ok[:, None], ra[None, :] - gk, float("-inf")))
                A += mm(qf.to(dt), tl.trans(kr.to(dt)), PREC)
            A = tl.where(crow[:, None] >= rt[None, :], A, 0.0)
            vc = tl.load(v + rt[:, None] * (HKV * V) + vv[None, :], mask=key_ok[:, None], other=0.0)
            acc += mm((A * scale).to(dt), vc, PREC)
            tl.store(o + row[:, None] * V + vv[None, :], acc.to(o.dtype.element_ty), mask=ok[:, None])
