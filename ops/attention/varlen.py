"""Attention through torch's flash-attention varlen kernel (``torch.nn.attention.varlen``).

One kernel call covers every document of a packed row: cu_seqlens go to the kernel as they are,
the sliding window is flash attention's ``window_size=(w, 0)`` (keys i - w .. i, the convention
SpikingBrain-7B was trained with) and grouped K/V heads are read natively. It has no sink keys;
those go to flex. Needs half precision on an sm80+ GPU and a torch whose ``varlen_attn`` takes
``window_size`` and ``scale`` (checked by signature, so an older torch falls back to flex).
"""

from __future__ import annotations

import inspect
import weakref

import torch

try:
    from torch.nn.attention.varlen import varlen_attn
    _PARAMS = inspect.signature(varlen_attn).parameters
except ImportError:  # torch without the varlen module
    varlen_attn, _PARAMS = None, {}

__all__ = ["attention_varlen", "varlen_unsupported"]

# (cu_seqlens, its version, its longest document) of the last few calls: every layer of a step
# passes one of a few cu_seqlens tensors (the step's own; under sequence parallelism also the
# halo's per-window boundaries), so the device-to-host read of the longest document happens once
# per tensor and step instead of once per layer.
_RECENT = 4
_recent_longest: list[tuple[weakref.ref, int, int]] = []


def _longest_document(cu_seqlens: torch.Tensor) -> int:
    for ref, version, longest in _recent_longest:
        if ref() is cu_seqlens and version == cu_seqlens._version:
            return longest
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    _recent_longest.insert(0, (weakref.ref(cu_seqlens), cu_seqlens._version, longest))
    del _recent_longest[_RECENT:]
    return longest


def varlen_unsupported(q: torch.Tensor, num_sinks: int) -> str | None:
    """Why the varlen kernel cannot run ``q`` ``[B, T, Hq, D]`` (None when it can)."""
    if varlen_attn is None or "window_size" not in _PARAMS or "scale" not in _PARAMS:
        return f"torch {torch.__version__} has no varlen_attn with window_size and scale"
    if num_sinks:
        return "varlen_attn has no sink keys (backend='flex' has)"
    if not q.is_cuda or torch.cuda.get_device_capability(q.device) < (8, 0):
        return "varlen_attn needs an sm80+ CUDA device"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"varlen_attn needs float16 or bfloat16, not {q.dtype}"
    if q.shape[-1] > 256 or q.shape[-1] % 8:
        return f"varlen_attn needs head_dim <= 256 and a multiple of 8, not {q.shape[-1]}"
    return None


def attention_varlen(q, k, v, *, window=None, sink_k=None, sink_v=None, cu_seqlens=None,
                     scale=None) -> torch.Tensor:
    """``attention`` as one flash-attention varlen call (no sinks).

    q ``[B, T, Hq, D]``; k, v ``[B, T, Hkv, D]``; cu_seqlens int ``[N+1]`` (B == 1) or None, in
    which case each row is one sequence. Inputs are assumed already checked. Returns
    ``[B, T, Hq, D]``. The longest document is read to the host (once per cu_seqlens tensor):
    the kernel's grid is sized by it, and the bound T would launch ~T / 128 mostly idle tiles
    per document.
    """
    reason = varlen_unsupported(q, 0 if sink_k is None else sink_k.shape[0])
    if reason:
        raise ValueError(f"backend='varlen': {reason}")
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    if cu_seqlens is None:
        cu = torch.arange(0, B * T + 1, T, device=q.device, dtype=torch.int32)
        longest = T
    else:
        cu = cu_seqlens.to(torch.int32)
        longest = _longest_document(cu_seqlens)
    kwargs = {"scale": scale, "window_size": (-1, 0) if window is None else (window, 0)}
    if "enable_gqa" in _PARAMS:  # newer torch asks for it; older ones pass grouped heads through
        kwargs["enable_gqa"] = Hq != Hkv
    out = varlen_attn(q.reshape(B * T, Hq, D), k.reshape(B * T, Hkv, D),
                      v.reshape(B * T, Hkv, D), cu, cu, longest, longest, **kwargs)
    return out.view(B, T, Hq, D)
