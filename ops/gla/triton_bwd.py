"""Triton backward kernels of chunked GLA, GQA-native (layouts and sub-chunk scheme as in
`ops.gla.triton_fwd`; do [TT, HQ, V] like o, dq/dk/dv/dg like q/k/v/g).

With h_n the state entering chunk n and dh_{n+1} the gradient of the state leaving it:
    dh_n = exp(gc_last) dh_{n+1} + U_n,   U_n = scale * sum_h (q^h exp(gc))^T do^h
    dv_j = sum_h sum_{i>=j} A^h_ij do^h_i + (k_j exp(gc_last - gc_j)) dh_{n+1}
    dq^h_i = scale * sum_{j<=i} dA^h_ij k_j exp(gc_i - gc_j) + scale * (do^h_i h_n^T) exp(gc_i)
    dk_j = scale * sum_h sum_{i>=j} dA^h_ij q^h_i exp(gc_i - gc_j) + (v_j dh_{n+1}^T) exp(gc_last - gc_j)
    dg_t = sum_{t' >= t in the chunk} (sum_h q^h dq^h - k dk)_t' + sum_v (dh_{n+1} * h_{n+1})
with dA^h_ij = do^h_i . v_j. The last term is the chunk-local form of the document-level rule
(reverse cumsum to the document end plus sum_v dS_T * S_T): the gradient reaching gc_last through
h_{n+1} = exp(gc_last) * (h_n + sum_j k_j exp(-gc_j) v_j^T) is h_{n+1} * dh_{n+1}, and telescoping
over the chunks gives back the document form, with no pass across chunks.
Key-side results (dk, dv) are kept per sub-chunk in four named accumulators (BT // BC == 4).
Kernels whose grid has a block axis put it first, so the programs of one chunk run side by side
and share its q and do through the L2 cache.
"""
import triton
import triton.language as tl

from .triton_fwd import (CHUNK_SETTINGS, STATE_SETTINGS, autotuned, causal, chunk_info, diagonal_row,
                         diagonal_span, mm, reference_row, row_live, stacked_rows, sub_factor)


@triton.jit
def add_at(b: tl.constexpr, x, a0, a1, a2, a3):
    """Add x to the b-th of four per-sub-chunk accumulators."""
    if b == 0:
        a0 += x
    elif b == 1:
        a1 += x
    elif b == 2:
        a2 += x
    else:
        a3 += x
    return a0, a1, a2, a3


@triton.jit
def sub_rows(base, s0: tl.constexpr, L, H: tl.constexpr, D: tl.constexpr, cols, BC: tl.constexpr):
    """[BC, len(cols)] float32: chunk rows s0 ... s0 + BC of a row-major [T, H * D] tensor whose
    base already points at the chunk's first row and the head (0 past the chunk's end)."""
    rc = tl.arange(0, BC)
    x = tl.load(base + (s0 + rc)[:, None] * (H * D) + cols[None, :], mask=(s0 + rc < L)[:, None],
                other=0.0)
    return x.to(tl.float32)


@autotuned(CHUNK_SETTINGS, key=["K", "V", "G"])
@triton.jit
def local_dstate_kernel(q, gc, do, U, tab, scale, HQ: tl.constexpr, HKV: tl.constexpr,
                        G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                        BT: tl.constexpr, BC: tl.constexpr, GP: tl.constexpr, PREC: tl.constexpr):
    """U[c, hk] [K, V] float32 = scale * sum over the chunk and the group's heads of
    (q exp(gc))^T do, the chunk's own share of the state gradient; grid (K/BK, NC, HKV)."""
    kq = tl.program_id(0) * BK + tl.arange(0, BK)
    c = tl.program_id(1).to(tl.int64)
    hk = tl.program_id(2)
    t0, L, _, _ = chunk_info(tab, c)
    if L == 0:
        return
    q += t0 * HQ * K + hk * G * K
    do += t0 * HQ * V + hk * G * V
    gc += (c * HKV + hk) * BT * K
    dt = q.dtype.element_ty
    vv = tl.arange(0, V)
    acc = tl.zeros([BK, V], dtype=tl.float32)
    for a in tl.static_range(BT // BC):
        if a * BC < L:
            row, crow, ok = stacked_rows(a * BC, L, HQ, G, BC, GP)
            q2 = tl.load(q + row[:, None] * K + kq[None, :], mask=ok[:, None], other=0.0)
            qe = q2.to(tl.float32) * tl.exp(tl.load(gc + crow[:, None] * K + kq[None, :]))
            do2 = tl.load(do + row[:, None] * V + vv[None, :], mask=ok[:, None], other=0.0)
            acc += mm(tl.trans(qe.to(dt)), do2, PREC)
    tl.store(U + ((c * HKV + hk) * K + kq[:, None]) * V + vv[None, :], acc * scale)


@autotuned(STATE_SETTINGS, key=["K", "V"])
@triton.jit
def bwd_state_kernel(gc, U, dht, dhs, dh0, doc_off, HKV: tl.constexpr, K: tl.constexpr,
                     V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
                     HAS_DHT: tl.constexpr):
    """Walk one document's chunks backwards for a [BK, BV] block of one KV head: store the
    gradient of the state leaving each chunk to dhs [NC, HKV, K, V] (q's dtype) and the gradient
    of the initial state (float32) to dh0 [N, HKV, K, V]. dht [N, HKV, K, V] optional.
    Grid (K/BK * V/BV, HKV, N)."""
    kb = tl.program_id(0) // (V // BV)
    vb = tl.program_id(0) % (V // BV)
    hk = tl.program_id(1)
    n = tl.program_id(2)
    rk = kb * BK + tl.arange(0, BK)
    rv = vb * BV + tl.arange(0, BV)
    c0 = tl.load(doc_off + n).to(tl.int64)
    c1 = tl.load(doc_off + n + 1).to(tl.int64)
    st = ((n * HKV + hk) * K + rk[:, None]) * V + rv[None, :]
    if HAS_DHT:
        dh = tl.load(dht + st).to(tl.float32)
    else:
        dh = tl.zeros([BK, BV], dtype=tl.float32)
    for i in range(c1 - c0):
        c = c1 - 1 - i
        blk = ((c * HKV + hk) * K + rk[:, None]) * V + rv[None, :]
        tl.store(dhs + blk, dh.to(dhs.dtype.element_ty))
        gl = tl.load(gc + ((c * HKV + hk) * BT + BT - 1) * K + rk)
        dh = dh * tl.exp(gl)[:, None] + tl.load(U + blk)
    tl.store(dh0 + st, dh)


@autotuned(CHUNK_SETTINGS, key=["K", "V", "G"])
@triton.jit
def dv_kernel(q, k, g, gc, do, dhs, dv, tab, scale, HQ: tl.constexpr, HKV: tl.constexpr,
              G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
              BT: tl.constexpr, BC: tl.constexpr, GP: tl.constexpr, GPP: tl.constexpr,
              PREC: tl.constexpr, SPAN: tl.constexpr):
    """dv for one chunk, KV head and block of BV value channels, summed over the group's query
    heads; grid (V/BV, NC, HKV)."""
    vv = tl.program_id(0) * BV + tl.arange(0, BV)
    c = tl.program_id(1).to(tl.int64)
    hk = tl.program_id(2)
    t0, L, _, _ = chunk_info(tab, c)
    if L == 0:
        return
    q += t0 * HQ * K + hk * G * K
    do += t0 * HQ * V + hk * G * V
    k += t0 * HKV * K + hk * K
    g += t0 * HKV * K + hk * K
    dv += t0 * HKV * V + hk * V
    dhs += (c * HKV + hk) * K * V
    gc += (c * HKV + hk) * BT * K
    dt = q.dtype.element_ty
    kk = tl.arange(0, K)
    rc = tl.arange(0, BC)
    rg = tl.arange(0, GPP)
    # The leaving state's gradient, read back through the decay to the chunk end.
    dh = tl.load(dhs + kk[:, None] * V + vv[None, :])
    gl = tl.load(gc + (BT - 1) * K + kk)
    dv0 = tl.zeros([BC, BV], dtype=tl.float32)
    dv1 = dv0
    dv2 = dv0
    dv3 = dv0
    for b in tl.static_range(BT // BC):
        gcb = tl.load(gc + (b * BC + rc)[:, None] * K + kk[None, :])
        kd = sub_rows(k, b * BC, L, HKV, K, kk, BC) * tl.exp(gl[None, :] - gcb)
        dv0, dv1, dv2, dv3 = add_at(b, mm(kd.to(dt), dh, PREC), dv0, dv1, dv2, dv3)
    for a in tl.static_range(BT // BC):
        s0 = a * BC
        if s0 < L:
            row, crow, ok = stacked_rows(s0, L, HQ, G, BC, GP)
            span = diagonal_span(gc, s0, reference_row(gc, s0, kk, K), kk, K, BC)[1]
            fast = span <= SPAN
            # A against the earlier key sub-chunks b < a, through the reference r_a, K in blocks;
            # on the fast path also against a's own keys (Ad, the diagonal block).
            A0 = tl.zeros([BC * GP, BC], dtype=tl.float32)
            A1 = A0
            A2 = A0
            A3 = A0
            Ad = A0
            for kb in tl.static_range(K // BK):
                kq = kb * BK + tl.arange(0, BK)
                q2 = tl.load(q + row[:, None] * K + kq[None, :], mask=ok[:, None], other=0.0)
                ra, F = sub_factor(gc, s0, crow, kq, K)
                qr = (q2.to(tl.float32) * F).to(dt)
                for b in tl.static_range(a):
                    gb = tl.load(gc + (b * BC + rc)[:, None] * K + kq[None, :])
                    kr = sub_rows(k, b * BC, L, HKV, K, kq, BC) * tl.exp(ra[None, :] - gb)
                    x = mm(qr, tl.trans(kr.to(dt)), PREC)
                    A0, A1, A2, A3 = add_at(b, x, A0, A1, A2, A3)
                if fast:
                    ga = tl.load(gc + (s0 + rc)[:, None] * K + kq[None, :])
                    kr = sub_rows(k, s0, L, HKV, K, kq, BC) * tl.exp(ra[None, :] - ga)
                    Ad += mm(qr, tl.trans(kr.to(dt)), PREC)
            do2 = tl.load(do + row[:, None] * V + vv[None, :], mask=ok[:, None], other=0.0)
            for b in tl.static_range(a):
                if b == 0:
                    Ab = A0
                elif b == 1:
                    Ab = A1
                else:
                    Ab = A2
                x = mm(tl.trans((Ab * scale).to(dt)), do2, PREC)
                dv0, dv1, dv2, dv3 = add_at(b, x, dv0, dv1, dv2, dv3)
            if fast:
                Ad = tl.where(causal(crow, s0, BC), Ad * scale, 0.0)
                dvd = mm(tl.trans(Ad.to(dt)), do2, PREC)
            else:  # diagonal block one query row (all heads) at a time; E as in the forward
                ka = sub_rows(k, s0, L, HKV, K, kk, BC)
                E = tl.zeros([BC, K], dtype=tl.float32)
                dvd = tl.zeros([BC, BV], dtype=tl.float32)
                for i in range(BC):
                    E, qrow, head_ok = diagonal_row(E, g, s0, i, L, kk, rc, rg, HQ, HKV, K, G, K, GPP)
                    qi = tl.load(q + qrow[:, None] * K + kk[None, :], mask=head_ok, other=0.0)
                    doi = tl.load(do + qrow[:, None] * V + vv[None, :], mask=head_ok, other=0.0)
                    Ai = mm(qi, tl.trans((ka * E).to(dt)), PREC) * scale
                    dvd += mm(tl.trans(Ai.to(dt)), doi, PREC)
            dv0, dv1, dv2, dv3 = add_at(a, dvd, dv0, dv1, dv2, dv3)
    out = dv + rc[:, None] * (HKV * V) + vv[None, :]
    step = BC * HKV * V
    tl.store(out, dv0.to(dv.dtype.element_ty), mask=(rc < L)[:, None])
    tl.store(out + step, dv1.to(dv.dtype.element_ty), mask=(BC + rc < L)[:, None])
    tl.store(out + 2 * step, dv2.to(dv.dtype.element_ty), mask=(2 * BC + rc < L)[:, None])
    tl.store(out + 3 * step, dv3.to(dv.dtype.element_ty), mask=(3 * BC + rc < L)[:, None])


@autotuned(CHUNK_SETTINGS, key=["K", "V", "G"])
@triton.jit
def dqkg_kernel(q, k, v, g, gc, hs, ht, do, dhs, dq, dk, dg, sdA, sdA_block, tab, scale,
                HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, K: tl.constexpr,
                V: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                GP: tl.constexpr, GPP: tl.constexpr, PREC: tl.constexpr, SPAN: tl.constexpr):
    """dq (every head of the group), dk and dg for one chunk, KV head and block of BK key
    channels; grid (K/BK, NC, HKV).

    sdA [K/BK, TT, HQ, BC] float32 (sdA_block elements per block of channels) is scratch for the
    row-by-row diagonal blocks of dA: made per query row (for dk) and read back per key column (for dq).
    """
    kb = tl.program_id(0)
    kq = kb * BK + tl.arange(0, BK)
    c = tl.program_id(1).to(tl.int64)
    hk = tl.program_id(2)
    t0, L, doc, last = chunk_info(tab, c)
    if L == 0:
        return
    q += t0 * HQ * K + hk * G * K
    dq += t0 * HQ * K + hk * G * K
    do += t0 * HQ * V + hk * G * V
    sdA += kb.to(tl.int64) * sdA_block + t0 * HQ * BC + hk * G * BC
    k += t0 * HKV * K + hk * K
    dk += t0 * HKV * K + hk * K
    g += t0 * HKV * K + hk * K
    dg += t0 * HKV * K + hk * K
    v += t0 * HKV * V + hk * V
    gc += (c * HKV + hk) * BT * K
    dt = q.dtype.element_ty
    vv = tl.arange(0, V)
    rc = tl.arange(0, BC)
    rg = tl.arange(0, GPP)
    kv = kq[:, None] * V + vv[None, :]
    h = tl.load(hs + (c * HKV + hk) * K * V + kv)
    dh = tl.load(dhs + (c * HKV + hk) * K * V + kv)
    # The state leaving the chunk: the next chunk's entering state, or the document's final state.
    h_out = tl.load(hs + ((c + 1) * HKV + hk) * K * V + kv, mask=kv * 0 + last == 0,
                    other=0.0).to(tl.float32)
    h_out += tl.load(ht + (doc * HKV + hk).to(tl.int64) * K * V + kv, mask=kv * 0 + last != 0,
                     other=0.0)
    e_last = tl.sum(dh.to(tl.float32) * h_out, axis=1)
    gl = tl.load(gc + (BT - 1) * K + kq)
    dk0 = tl.zeros([BC, BK], dtype=tl.float32)
    dk1 = dk0
    dk2 = dk0
    dk3 = dk0
    for b in tl.static_range(BT // BC):
        vb = sub_rows(v, b * BC, L, HKV, V, vv, BC).to(dt)
        gb = tl.load(gc + (b * BC + rc)[:, None] * K + kq[None, :])
        x = mm(vb, tl.trans(dh), PREC) * tl.exp(gl[None, :] - gb)
        dk0, dk1, dk2, dk3 = add_at(b, x, dk0, dk1, dk2, dk3)
    qdq0 = tl.zeros([BC, BK], dtype=tl.float32)
    qdq1 = qdq0
    qdq2 = qdq0
    qdq3 = qdq0
    for a in tl.static_range(BT // BC):
        s0 = a * BC
        if s0 < L:
            row, crow, ok = stacked_rows(s0, L, HQ, G, BC, GP)
            q2 = tl.load(q + row[:, None] * K + kq[None, :], mask=ok[:, None], other=0.0)
            do2 = tl.load(do + row[:, None] * V + vv[None, :], mask=ok[:, None], other=0.0)
            ra, F = sub_factor(gc, s0, crow, kq, K)
            qr = (q2.to(tl.float32) * F).to(dt)
            dq2 = mm(do2, tl.trans(h), PREC) * tl.exp(ra)[None, :]
            for b in tl.static_range(a):  # earlier key sub-chunks, through the reference r_a
                gb = tl.load(gc + (b * BC + rc)[:, None] * K + kq[None, :])
                decay = tl.exp(ra[None, :] - gb)
                vb = sub_rows(v, b * BC, L, HKV, V, vv, BC).to(dt)
                dA = mm(do2, tl.trans(vb), PREC).to(dt)
                kr = sub_rows(k, b * BC, L, HKV, K, kq, BC) * decay
                dq2 += mm(dA, kr.to(dt), PREC)
                x = mm(tl.trans(dA), qr, PREC) * decay * scale
                dk0, dk1, dk2, dk3 = add_at(b, x, dk0, dk1, dk2, dk3)
            ka = sub_rows(k, s0, L, HKV, K, kq, BC)
            va = sub_rows(v, s0, L, HKV, V, vv, BC).to(dt)
            i3 = tl.arange(0, BC)[:, None]
            r3 = (s0 + i3) * HQ + tl.arange(0, GP)[None, :]
            ok3 = (s0 + i3 < L) & (tl.arange(0, GP)[None, :] < G)
            ga, span = diagonal_span(gc, s0, ra, kq, K, BC)
            if span <= SPAN:  # diagonal block through r_a too: key factors in [1, exp(SPAN)]
                dAd = tl.where(causal(crow, s0, BC), mm(do2, tl.trans(va), PREC), 0.0).to(dt)
                kf = tl.exp(ra[None, :] - ga)
                dq2 = (dq2 + mm(dAd, (ka * kf).to(dt), PREC)) * F * scale
                dkd = mm(tl.trans(dAd), qr, PREC) * kf
                dq3 = tl.reshape(dq2, (BC, GP, BK))
            else:
                dq2 = dq2 * F * scale
                # Row by row. Per query row i (all heads): the dA row, stored for the dq pass
                # below, and its share of dk through E[j] = exp(gc_i - gc_j).
                E = tl.zeros([BC, BK], dtype=tl.float32)
                dkd = tl.zeros([BC, BK], dtype=tl.float32)
                for i in range(BC):
                    E, qrow, head_ok = diagonal_row(E, g, s0, i, L, kq, rc, rg, HQ, HKV, K, G, BK, GPP)
                    qi = tl.load(q + qrow[:, None] * K + kq[None, :], mask=head_ok, other=0.0)
                    doi = tl.load(do + qrow[:, None] * V + vv[None, :], mask=head_ok, other=0.0)
                    dAi = mm(doi, tl.trans(va), PREC)
                    dAi = tl.where(rc[None, :] <= i, dAi, 0.0)
                    tl.store(sdA + qrow[:, None] * BC + rc[None, :], dAi, mask=head_ok)
                    dkd += mm(tl.trans(dAi.to(dt)), qi, PREC) * E
                tl.debug_barrier()  # the dA rows just stored are read back by other threads
                # Per key row j (descending): e[i] = exp(gc_i - gc_j) for i >= j, grown from
                # e_{j+1}, kept [BC, 1, BK] so that it broadcasts over the heads of dq3 without
                # a layout change.
                dq3 = tl.reshape(dq2, (BC, GP, BK))
                e = tl.zeros([BC, 1, BK], dtype=tl.float32)
                for jj in range(BC):
                    j = BC - 1 - jj
                    gn = tl.load(g + (s0 + j + 1) * (HKV * K) + kq, mask=row_live(s0 + j + 1, L, BK),
                                 other=0.0)
                    e = tl.where(i3[:, :, None] == j, 1.0, e * tl.exp(gn.to(tl.float32))[None, None, :])
                    kj = tl.load(k + (s0 + j) * (HKV * K) + kq, mask=row_live(s0 + j, L, BK), other=0.0)
                    col = tl.load(sdA + r3 * BC + j, mask=ok3, other=0.0)
                    dq3 += col[:, :, None] * (e * (kj.to(tl.float32) * scale)[None, None, :])
            dk0, dk1, dk2, dk3 = add_at(a, dkd * scale, dk0, dk1, dk2, dk3)
            ptr3 = r3[:, :, None] * K + kq[None, None, :]
            tl.store(dq + ptr3, dq3.to(dq.dtype.element_ty), mask=ok3[:, :, None])
            q3 = tl.load(q + ptr3, mask=ok3[:, :, None], other=0.0).to(tl.float32)
            qdq0, qdq1, qdq2, qdq3 = add_at(a, tl.sum(q3 * dq3, axis=1), qdq0, qdq1, qdq2, qdq3)
    # dg: within-chunk reverse cumsum of q.dq - k.dk, plus the leaving state's share.
    d3 = qdq3 - sub_rows(k, 3 * BC, L, HKV, K, kq, BC) * dk3
    d2 = qdq2 - sub_rows(k, 2 * BC, L, HKV, K, kq, BC) * dk2
    d1 = qdq1 - sub_rows(k, BC, L, HKV, K, kq, BC) * dk1
    d0 = qdq0 - sub_rows(k, 0, L, HKV, K, kq, BC) * dk0
    tail3 = e_last[None, :]
    tail2 = tail3 + tl.sum(d3, axis=0)[None, :]
    tail1 = tail2 + tl.sum(d2, axis=0)[None, :]
    tail0 = tail1 + tl.sum(d1, axis=0)[None, :]
    base = rc[:, None] * (HKV * K) + kq[None, :]
    step = BC * HKV * K
    tk = dk.dtype.element_ty
    tg = dg.dtype.element_ty
    tl.store(dk + base, dk0.to(tk), mask=(rc < L)[:, None])
    tl.store(dk + base + step, dk1.to(tk), mask=(BC + rc < L)[:, None])
    tl.store(dk + base + 2 * step, dk2.to(tk), mask=(2 * BC + rc < L)[:, None])
    tl.store(dk + base + 3 * step, dk3.to(tk), mask=(3 * BC + rc < L)[:, None])
    tl.store(dg + base, (tl.cumsum(d0, axis=0, reverse=True) + tail0).to(tg), mask=(rc < L)[:, None])
    tl.store(dg + base + step, (tl.cumsum(d1, axis=0, reverse=True) + tail1).to(tg),
             mask=(BC + rc < L)[:, None])
    tl.store(dg + base + 2 * step, (tl.cumsum(d2, axis=0, reverse=True) + tail2).to(tg),
             mask=(2 * BC + rc < L)[:, None])
    tl.store(dg + base + 3 * step, (tl.cumsum(d3, axis=0, reverse=True) + tail3).to(tg),
             mask=(3 * BC + rc < L)[:, None])
