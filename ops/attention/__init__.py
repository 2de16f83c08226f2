"""Causal softmax attention (sliding window, sink tokens, packed documents): the dispatcher.

``attention`` checks its inputs once, then hands them to the fastest backend that supports the
device and options. Backends share one signature; a fast kernel plugs in by adding a branch to
``pick_backend``. The masking rules live in ``reference.visibility_mask``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ops.attention.reference import attention_reference, check_attention_inputs, visibility_mask

__all__ = ["attention", "attention_reference", "attention_sdpa", "pick_backend", "visibility_mask"]


def attention_sdpa(q, k, v, *, window=None, sink_k=None, sink_v=None, cu_seqlens=None,
                   scale=None) -> torch.Tensor:
    """``attention`` through ``torch.nn.functional.scaled_dot_product_attention``.

    Plain causal attention takes SDPA's ``is_causal`` route (flash attention on GPU in half
    precision); otherwise an explicit boolean ``[T, S + T]`` mask, broadcast over batch and heads,
    selects the memory-efficient kernel, so extra memory is the mask (T * (S + T)) and K/V
    repeated per query head, never the full score matrix.
    Shapes as in ``attention``; inputs are assumed already checked.
    """
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
    num_sinks = 0 if sink_k is None else sink_k.shape[0]
    full_causal = num_sinks == 0 and cu_seqlens is None and (window is None or window >= T - 1)
    if num_sinks:
        # sinks are shared by every row of the batch: prepend them to each row's keys
        kh = torch.cat([sink_k.transpose(0, 1).unsqueeze(0).expand(B, -1, -1, -1), kh], dim=2)
        vh = torch.cat([sink_v.transpose(0, 1).unsqueeze(0).expand(B, -1, -1, -1), vh], dim=2)
    # Only flash attention (causal, half precision) reads grouped K/V natively; elsewhere
    # enable_gqa would drop to the math kernel that materialises every score, and repeated K/V
    # cost far less than that (checked on torch 2.11, H100).
    native_gqa = Hq != Hkv and full_causal and q.dtype in (torch.float16, torch.bfloat16)
    if Hq != Hkv and not native_gqa:
        kh = kh.repeat_interleave(Hq // Hkv, dim=1)
        vh = vh.repeat_interleave(Hq // Hkv, dim=1)
    if full_causal:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale,
                                             enable_gqa=native_gqa)
    else:
        mask = visibility_mask(T, window=window, cu_seqlens=cu_seqlens, num_sinks=num_sinks,
                               device=q.device)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def pick_backend(q: torch.Tensor):
    """The attention implementation used for ``q``'s device."""
    if q.is_cuda:
        return attention_sdpa
    return attention_reference


# Packed inputs are cut at document boundaries into bins of about this many tokens: attention
# never crosses a document, so each bin is exact on its own, and the dense backends then cost
# sum(bin^2) instead of T^2 (16 rows of 256 tokens: 8 bins of 512 instead of one 4096 x 4096).
BIN_TOKENS = 512


def document_bins(cu_seqlens: torch.Tensor) -> list[list[int]]:
    """Greedy groups of whole documents, each as its boundaries [a, ..., b] (one host read)."""
    bounds = cu_seqlens.tolist()
    bins, current = [], [bounds[0]]
    for end in bounds[1:]:
        if end - current[0] > BIN_TOKENS and len(current) > 1:
            bins.append(current)
            current = [current[-1]]
        current.append(end)
    bins.append(current)
    return bins


def attention(q, k, v, *, window=None, sink_k=None, sink_v=None, cu_seqlens=None,
              scale=None) -> torch.Tensor:
    """Causal GQA softmax attention with optional sliding window, sink tokens and documents.

    q ``[B, T, Hq, D]``; k, v ``[B, T, Hkv, D]`` with ``Hq % Hkv == 0`` (query head h reads KV
    head ``h // (Hq // Hkv)``). ``window=w``: query i sees keys ``i - w ... i``. ``sink_k``,
    ``sink_v`` ``[S, Hkv, D]``: extra keys every query sees. ``cu_seqlens`` int ``[N+1]``
    (B == 1): document boundaries along T. ``scale`` defaults to ``D ** -0.5``.
    Returns ``[B, T, Hq, D]`` in q's dtype.
    """
    check_attention_inputs(q, k, v, window=window, sink_k=sink_k, sink_v=sink_v,
                           cu_seqlens=cu_seqlens, scale=scale)
    backend = pick_backend(q)
    bins = document_bins(cu_seqlens) if cu_seqlens is not None and q.shape[1] > BIN_TOKENS else None
    if bins is None or len(bins) == 1:
        return backend(q, k, v, window=window, sink_k=sink_k, sink_v=sink_v,
                       cu_seqlens=cu_seqlens, scale=scale)
    outs = []
    for bounds in bins:
        a, b = bounds[0], bounds[-1]
        local = torch.tensor([x - a for x in bounds], device=cu_seqlens.device, dtype=cu_seqlens.dtype)
        outs.append(backend(q[:, a:b], k[:, a:b], v[:, a:b], window=window, sink_k=sink_k,
                            sink_v=sink_v, cu_seqlens=local, scale=scale))
    return torch.cat(outs, dim=1)
