"""Causal softmax attention with sliding window, sink tokens and packed documents: the rules.

Everything here is plain PyTorch. ``visibility_mask`` is the single place the masking rules live;
the reference and the SDPA path in ``ops.attention`` both build their mask with it.

Rules (query i, key j, both positions along T):
  * causal: j <= i;
  * window w: i - w <= j (w + 1 keys, the flash-attention ``window_size=(w, 0)`` convention);
  * cu_seqlens: i and j lie in the same document;
  * sinks: S extra key/value pairs, visible to every query regardless of window and document.
"""

from __future__ import annotations

import torch


def check_attention_inputs(q, k, v, *, window=None, sink_k=None, sink_v=None, cu_seqlens=None,
                           scale=None) -> None:
    """Raise ValueError unless the arguments follow ``attention``'s contract.

    Values of ``cu_seqlens`` are only checked when it lives on the CPU: reading a GPU tensor
    would stall the stream on every call.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    B, T, Hq, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"k/v {tuple(k.shape)} must match q {tuple(q.shape)} in batch, length "
                         "and head_dim")
    Hkv = k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on the same device")
    if not q.is_floating_point():
        raise ValueError(f"q, k, v must be floating point; got {q.dtype}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise ValueError(f"window must be a non-negative int or None; got {window!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"scale must be a number or None; got {scale!r}")
    if (sink_k is None) != (sink_v is None):
        raise ValueError("sink_k and sink_v must be given together")
    if sink_k is not None:
        if sink_k.dim() != 3 or sink_k.shape != sink_v.shape or sink_k.shape[1:] != (Hkv, D):
            raise ValueError(f"sink_k and sink_v must both be [S, Hkv={Hkv}, D={D}]; got "
                             f"{tuple(sink_k.shape)} and {tuple(sink_v.shape)}")
        if sink_k.dtype != q.dtype or sink_v.dtype != q.dtype:
            raise ValueError(f"sink_k/sink_v dtype must match q ({q.dtype}); got "
                             f"{sink_k.dtype}, {sink_v.dtype}")
        if sink_k.device != q.device or sink_v.device != q.device:
            raise ValueError("sink_k/sink_v must be on q's device")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens needs packed input with batch size 1; got B={B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be 1-D [N+1] with N >= 1; got "
                             f"{tuple(cu_seqlens.shape)}")
        if cu_seqlens.dtype not in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens must be an integer tensor; got {cu_seqlens.dtype}")
        if cu_seqlens.device != q.device:
            raise ValueError("cu_seqlens must be on q's device")
        if cu_seqlens.device.type == "cpu":
            bounds = cu_seqlens.tolist()
            if bounds[0] != 0 or bounds[-1] != T or any(a > b for a, b in zip(bounds, bounds[1:])):
                raise ValueError(f"cu_seqlens must rise from 0 to T={T} without decreasing; "
                                 f"got {bounds}")


def visibility_mask(T: int, *, window: int | None = None, cu_seqlens: torch.Tensor | None = None,
                    num_sinks: int = 0, device=None) -> torch.Tensor:
    """Boolean ``[T, num_sinks + T]`` mask, True where query i may attend to a key.

    Columns ``[0, num_sinks)`` are the sinks (always visible); column ``num_sinks + j`` is key j.
    """
    if cu_seqlens is not None:
        device = cu_seqlens.device
    pos = torch.arange(T, device=device)
    distance = pos[:, None] - pos[None, :]  # i - j
    mask = distance >= 0
    if window is not None:
        mask &= distance <= window
    if cu_seqlens is not None:
        # index of the last boundary <= t; empty documents (repeated boundaries) own no position
        doc = torch.searchsorted(cu_seqlens.to(torch.int64), pos, right=True)
        mask &= doc[:, None] == doc[None, :]
    if num_sinks:
        mask = torch.cat([mask.new_ones(T, num_sinks), mask], dim=1)
    return mask


def attention_reference(q, k, v, *, window=None, sink_k=None, sink_v=None, cu_seqlens=None,
                        scale=None) -> torch.Tensor:
    """Causal GQA softmax attention, computed densely in float32 (float64 stays float64).

    q ``[B, T, Hq, D]``; k, v ``[B, T, Hkv, D]``; sink_k, sink_v ``[S, Hkv, D]``;
    cu_seqlens int ``[N+1]`` (B == 1). Query head h reads KV head ``h // (Hq // Hkv)``.
    Returns ``[B, T, Hq, D]`` in q's dtype.
    """
    check_attention_inputs(q, k, v, window=window, sink_k=sink_k, sink_v=sink_v,
                           cu_seqlens=cu_seqlens, scale=scale)
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    dtype = torch.promote_types(q.dtype, torch.float32)

    # [B, Hkv, G, T, D] against [B, Hkv, 1, T', D]: the group shares K/V by broadcasting
    qg = q.to(dtype).reshape(B, T, Hkv, G, D).permute(0, 2, 3, 1, 4)
    kg = k.to(dtype).permute(0, 2, 1, 3).unsqueeze(2)
    vg = v.to(dtype).permute(0, 2, 1, 3).unsqueeze(2)
    num_sinks = 0
    if sink_k is not None:
        num_sinks = sink_k.shape[0]
        sk = sink_k.to(dtype).permute(1, 0, 2)[None, :, None].expand(B, -1, -1, -1, -1)
        sv = sink_v.to(dtype).permute(1, 0, 2)[None, :, None].expand(B, -1, -1, -1, -1)
        kg = torch.cat([sk, kg], dim=3)
        vg = torch.cat([sv, vg], dim=3)

    mask = visibility_mask(T, window=window, cu_seqlens=cu_seqlens, num_sinks=num_sinks,
                           device=q.device)
    scores = (qg @ kg.transpose(-1, -2)) * scale  # [B, Hkv, G, T, S + T]
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vg  # [B, Hkv, G, T, D]
    return out.permute(0, 3, 1, 2, 4).reshape(B, T, Hq, D).to(q.dtype)
