"""Attention through ``torch.nn.attention.flex_attention`` with a block mask built from cu_seqlens.

One flex call covers a whole packed row: documents, sliding window and sink keys are all in the
mask, so no Python loop over documents and no ``[T, T]`` tensor: the block mask holds
``[T / 128, T / 128]`` block indices, the document ids ``[T]``, and flex's working memory is linear
in T.

Key layout seen by the kernel, ``P = ceil(S / 128) * 128`` columns of sinks first:
``[sinks (S) | zero padding (P - S) | tokens (T)]``. Padding the sink region to a whole block keeps
token key block n aligned with query block n, so the block mask is the same arithmetic with or
without sinks; the padding columns are masked out. T itself is not padded: flex bounds the last
partial block, and the mask_mod also rejects positions past T (their document id never matches).

On CUDA the kernel comes from ``torch.compile(flex_attention)``, compiled once per (T, window,
S, dtype): the window is a constant of the mask_mod, and the block mask and document ids are
tensors whose shapes depend on T and S only, so new cu_seqlens values between steps (even a new
number of documents) reuse the compiled kernel. Elsewhere flex runs its unfused eager form
(dense scores; for tests).
"""

from __future__ import annotations

import torch

from torch.nn.attention.flex_attention import BlockMask, flex_attention

__all__ = ["BLOCK", "attention_flex", "flex_block_mask", "sink_span"]

BLOCK = 128  # flex's sparse block size: one BlockMask entry covers BLOCK queries x BLOCK keys

_compiled_flex = None


def sink_span(num_sinks: int) -> int:
    """Key columns taken by ``num_sinks`` sinks and their padding: a whole number of blocks."""
    return -(-num_sinks // BLOCK) * BLOCK


def _document_ids(cu_seqlens: torch.Tensor | None, T: int, num_sinks: int,
                  device) -> torch.Tensor:
    """int32 ``[P + ceil(T / BLOCK) * BLOCK]``: document id of every key column.

    Token position t sits at column ``P + t`` and has id >= 1; the sink region holds 0 (never a
    document) and positions past T hold ``N + 1`` (never a real document), so the mask_mod can
    index it with any in-block query or key position without going out of bounds.
    """
    P = sink_span(num_sinks)
    positions = torch.arange(-(-T // BLOCK) * BLOCK, device=device)
    if cu_seqlens is None:
        doc = (positions >= T).to(torch.int32) + 1
    else:
        doc = torch.searchsorted(cu_seqlens.to(torch.int64), positions, right=True).to(torch.int32)
    return torch.cat([doc.new_zeros(P), doc])


def _mask_mod(doc: torch.Tensor, num_sinks: int, window: int | None):
    """Element rule for partial blocks: (q_idx, kv_idx) -> visible, kv in the sink-first layout."""
    P = sink_span(num_sinks)

    def mask_mod(b, h, q_idx, kv_idx):
        j = kv_idx - P  # token position of the key (negative in the sink region)
        visible = (j >= 0) & (j <= q_idx) & (doc[kv_idx] == doc[q_idx + P])
        if window is not None:
            visible = visible & (q_idx - j <= window)
        if num_sinks:
            visible = visible | (kv_idx < num_sinks)
        return visible

    return mask_mod


def _document_start(cu: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """First position of the document holding each of ``positions`` (all < T), int64."""
    return cu[torch.searchsorted(cu, positions, right=True) - 1]


def flex_block_mask(cu_seqlens: torch.Tensor | None, T: int, *, window: int | None = None,
                    num_sinks: int = 0, device=None) -> BlockMask:
    """BlockMask over ``T`` queries and ``P + T`` keys (layout in the module docstring).

    Built from the document starts of each query block's first and last query, never from a
    ``[T, T]`` grid. For query block m (queries q0 .. q1), with start(i) its document's start:
      * key j is seen by some query of the block iff ``max(start(q0), q0 - w) <= j <= q1``
        (start and i - w rise with i, so q0 bounds from below; a key after q0 in the block is
        seen by itself), so the visible token blocks are one run ending on the diagonal;
      * token block n < m is full iff every query sees every key: ``n * BLOCK >= max(start(q1),
        q1 - w)``; the diagonal block is always partial (it holds keys after some queries).
    Sink blocks are full; the last one is partial when S is not a multiple of BLOCK (padding).
    Index tensors are ``[1, 1, Qb, KVb]`` int32 (Qb = ceil(T / BLOCK), KVb = Qb + P / BLOCK, the
    width BlockMask expects when it transposes them for the backward): 4 MiB at T = 131072, and
    their shapes depend on T and S only. cu_seqlens int ``[N+1]`` or None (one document).
    """
    if cu_seqlens is not None:
        device = cu_seqlens.device
    P = sink_span(num_sinks)
    full_sinks, partial_sink = num_sinks // BLOCK, int(num_sinks % BLOCK != 0)
    qb = -(-T // BLOCK)
    kvb = qb + P // BLOCK
    m = torch.arange(qb, device=device)
    q0 = m * BLOCK
    q1 = torch.clamp(q0 + BLOCK, max=T) - 1
    if cu_seqlens is None:
        lo, lo_full = torch.zeros_like(q0), torch.zeros_like(q1)
    else:
        cu = cu_seqlens.to(torch.int64)
        lo, lo_full = _document_start(cu, q0), _document_start(cu, q1)
    if window is not None:
        lo, lo_full = torch.maximum(lo, q0 - window), torch.maximum(lo_full, q1 - window)
    first = lo // BLOCK  # first token block with a visible key
    first_full = -(-lo_full // BLOCK)  # first full token block (full ones stop before m)
    n_full = torch.clamp(m - first_full, min=0)
    n_partial = torch.clamp(torch.minimum(first_full, m) - first, min=0)  # before the diagonal

    # Unused tail entries still hold valid block indices: BlockMask reads them when transposing.
    c = torch.arange(kvb - partial_sink, device=device)
    partial = torch.where(c < n_partial[:, None], first[:, None] + c, m[:, None])
    c = torch.arange(kvb - full_sinks, device=device)
    full = torch.where(c < n_full[:, None], first_full[:, None] + c, 0)
    sinks_full = torch.arange(full_sinks, device=device).expand(qb, -1)
    sinks_partial = torch.full((qb, partial_sink), full_sinks, device=device)
    kv_indices = torch.cat([sinks_partial, partial + P // BLOCK], dim=1)
    full_indices = torch.cat([sinks_full, full + P // BLOCK], dim=1)
    kv_num = n_partial + 1 + partial_sink  # + 1: the diagonal
    full_num = n_full + full_sinks
    as_mask = lambda t: t.to(torch.int32)[None, None].contiguous()  # [B=1, H=1, ...] broadcasts
    return BlockMask.from_kv_blocks(
        as_mask(kv_num), as_mask(kv_indices), as_mask(full_num), as_mask(full_indices),
        BLOCK_SIZE=BLOCK, mask_mod=_mask_mod(_document_ids(cu_seqlens, T, num_sinks, device),
                                             num_sinks, window),
        seq_lengths=(T, P + T))


def _flex_kernel(device: torch.device):
    """The compiled flex_attention on CUDA, its eager form elsewhere."""
    global _compiled_flex
    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        # dynamic=False: T changes only between training stages, and static shapes give the
        # kernels flex tunes for; each (T, window, S, dtype, grad mode) compiles once.
        compiled = torch.compile(flex_attention, dynamic=False)
        # Past dynamo's default of 8 compiles per function it would silently run flex unfused
        # (dense scores, quadratic memory): allow more variants, and fail loudly past those.
        limits = torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True)

        def run(*args, **kwargs):
            with limits:
                return compiled(*args, **kwargs)

        _compiled_flex = run
    return _compiled_flex


def attention_flex(q, k, v, *, window=None, sink_k=None, sink_v=None, cu_seqlens=None,
                   scale=None) -> torch.Tensor:
    """``attention`` as one flex_attention call over the whole (packed) row.

    q ``[B, T, Hq, D]``; k, v ``[B, T, Hkv, D]``; sink_k, sink_v ``[S, Hkv, D]``; cu_seqlens int
    ``[N+1]`` (B == 1). Inputs are assumed already checked. Returns ``[B, T, Hq, D]``.
    Extra memory: K/V copied once with the sinks in front (``[B, Hkv, P + T, D]``, only with
    sinks), the document ids and the block mask; no score matrix on CUDA.
    """
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    num_sinks = 0 if sink_k is None else sink_k.shape[0]
    if num_sinks:
        pad = sink_span(num_sinks) - num_sinks
        sinks = [torch.cat([s, s.new_zeros(pad, Hkv, D)]) if pad else s for s in (sink_k, sink_v)]
        k, v = (torch.cat([s.unsqueeze(0).expand(B, -1, -1, -1), x], dim=1)
                for s, x in zip(sinks, (k, v)))
    mask = flex_block_mask(cu_seqlens, T, window=window, num_sinks=num_sinks, device=q.device)
    out = _flex_kernel(q.device)(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                 block_mask=mask, scale=scale, enable_gqa=Hq != Hkv)
    return out.transpose(1, 2)
