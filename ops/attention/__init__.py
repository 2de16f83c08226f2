"""Causal softmax attention (sliding window, sink tokens, packed documents): the dispatcher.

``attention`` checks its inputs once, then hands them to a backend; all backends share one
signature and the masking rules of ``reference.visibility_mask``:
  * ``reference``: dense float32 math, the ground truth and the CPU path;
  * ``sdpa``: SDPA with ``is_causal`` for plain causal attention, else a dense ``[T, S + T]``
    mask (kept as the benchmark peer for masked cases: its mask is quadratic in T);
  * ``flex``: one flex_attention call with a block mask built from cu_seqlens (``flex.py``);
  * ``varlen``: one flash-attention varlen call, no sinks (``varlen.py``);
  * ``triton``: the project's own flash attention, windows, sinks and documents in one launch per
    pass (``triton_attn.py``).
``pick_backend`` chooses per device and case; ``backend=`` overrides it (benchmarks, tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ops.attention.flex import attention_flex
from ops.attention.reference import attention_reference, check_attention_inputs, visibility_mask
from ops.attention.varlen import attention_varlen, varlen_unsupported

try:
    from ops.attention import triton_attn
except ImportError:  # no triton on this machine: the other backends serve every call
    triton_attn = None

__all__ = ["BACKENDS", "attention", "attention_flex", "attention_reference", "attention_sdpa",
           "attention_triton", "attention_varlen", "pick_backend", "visibility_mask"]


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


def attention_triton(q, k, v, *, window=None, sink_k=None, sink_v=None, cu_seqlens=None,
                     scale=None) -> torch.Tensor:
    """``attention`` on the project's Triton kernels (``triton_attn.py``)."""
    num_sinks = 0 if sink_k is None else sink_k.shape[0]
    if triton_attn is None or not triton_attn.supports(q, num_sinks):
        raise ValueError("backend='triton' needs triton, a CUDA device, float16/bfloat16/float32 "
                         f"and head_dim in {(16, 32, 64, 128)}; got {q.dtype} {tuple(q.shape)} on "
                         f"{q.device}")
    return triton_attn.attention_triton(q, k, v, window=window, sink_k=sink_k, sink_v=sink_v,
                                        cu_seqlens=cu_seqlens, scale=scale)


def pick_backend(q: torch.Tensor, *, window: int | None, num_sinks: int, packed: bool) -> str:
    """Name of the backend ``attention`` uses for ``q`` ``[B, T, Hq, D]`` and this case.

    ``window`` is already normalised (None when it spans the whole row). CPU and other devices:
    the reference. CUDA: plain causal attention is SDPA's ``is_causal`` (cuDNN, 451-493 useful
    TFLOP/s fwd+bwd on an H200 at 8k-32k); documents, a window or sinks go to the project's
    Triton kernel (212-320 TFLOP/s there, ahead of flash varlen and flex in every such case,
    docs/BENCHMARKS.md), else flash varlen (no sinks), else flex.
    """
    if not q.is_cuda:
        return "reference"
    if not num_sinks and not packed and window is None:
        return "sdpa"
    if triton_attn is not None and triton_attn.supports(q, num_sinks):
        return "triton"
    if varlen_unsupported(q, num_sinks) is None:
        return "varlen"
    return "flex"


BACKENDS = {"reference": attention_reference, "sdpa": attention_sdpa, "flex": attention_flex,
            "varlen": attention_varlen, "triton": attention_triton}


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
              scale=None, backend: str | None = None) -> torch.Tensor:
    """Causal GQA softmax attention with optional sliding window, sink tokens and documents.

    q ``[B, T, Hq, D]``; k, v ``[B, T, Hkv, D]`` with ``Hq % Hkv == 0`` (query head h reads KV
    head ``h // (Hq // Hkv)``). ``window=w``: query i sees keys ``i - w ... i``. ``sink_k``,
    ``sink_v`` ``[S, Hkv, D]``: extra keys every query sees. ``cu_seqlens`` int ``[N+1]``
    (B == 1): document boundaries along T. ``scale`` defaults to ``D ** -0.5``. ``backend``:
    None picks one (``pick_backend``), or a name from ``BACKENDS``.
    Returns ``[B, T, Hq, D]`` in q's dtype.
    """
    check_attention_inputs(q, k, v, window=window, sink_k=sink_k, sink_v=sink_v,
                           cu_seqlens=cu_seqlens, scale=scale)
    T = q.shape[1]
    if window is not None and window >= T - 1:
        window = None  # it covers every earlier key: full attention, one compiled mask fewer
    num_sinks = 0 if sink_k is None else sink_k.shape[0]
    if backend is None:
        backend = pick_backend(q, window=window, num_sinks=num_sinks, packed=cu_seqlens is not None)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {sorted(BACKENDS)}; got {backend!r}")
    fn = BACKENDS[backend]
    kwargs = dict(window=window, sink_k=sink_k, sink_v=sink_v, scale=scale)
    # Only the dense backends gain from cutting the row at document boundaries (their cost is
    # quadratic in the piece length); flex and varlen take the whole row in one call.
    dense = backend in ("reference", "sdpa")
    bins = document_bins(cu_seqlens) if dense and cu_seqlens is not None and T > BIN_TOKENS else None
    if bins is None or len(bins) == 1:
        return fn(q, k, v, cu_seqlens=cu_seqlens, **kwargs)
    outs = []
    for bounds in bins:
        a, b = bounds[0], bounds[-1]
        local = torch.tensor([x - a for x in bounds], device=cu_seqlens.device, dtype=cu_seqlens.dtype)
        outs.append(fn(q[:, a:b], k[:, a:b], v[:, a:b], cu_seqlens=local, **kwargs))
    return torch.cat(outs, dim=1)
