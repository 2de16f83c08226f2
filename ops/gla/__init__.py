"""Gated linear attention (GLA): public entry points that pick an implementation per call.

Layout is time-major: q [B, T, Hq, K], k/g [B, T, Hkv, K], v [B, T, Hkv, V], with g <= 0 the
per-channel log-decay and Hq a multiple of Hkv (GQA groups share one state per KV head). See
`ops.gla.reference` for the exact semantics, which every implementation must reproduce.
"""
import torch

from .reference import chunk_gla_reference, recurrent_gla_reference

__all__ = ["chunk_gla", "recurrent_gla"]


def chunk_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *,
              scale: float | None = None, initial_state: torch.Tensor | None = None,
              output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
              chunk_size: int = 16) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked GLA for training.

    chunk_size only trades speed for memory (the result is the same): the reference's intra-chunk
    work grows linearly with it, and 16 was fastest on CPU at T=256 (8: 0.098 s, 16: 0.090 s,
    64: 0.53 s for forward+backward of B=16, Hkv=2, K=32).

    q [B, T, Hq, K], k/g [B, T, Hkv, K], v [B, T, Hkv, V], initial_state [N, Hkv, K, V],
    cu_seqlens [N+1] cumulative document lengths along T (requires B == 1)
    -> o [B, T, Hq, V] in q's dtype, final_state [N, Hkv, K, V] float32 (float64 for float64 q) or None.
    scale defaults to K ** -0.5.
    """
    # A fast path joins here ahead of the reference, behind a check of the device and of the
    # shapes it supports; the reference is the fallback that handles every device and shape.
    return chunk_gla_reference(q, k, v, g, scale=scale, initial_state=initial_state,
                               output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                               chunk_size=chunk_size)


def recurrent_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *,
                  scale: float | None = None, initial_state: torch.Tensor | None = None,
                  output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step-by-step GLA (decoding, short inputs); same shapes and semantics as `chunk_gla`."""
    # As in chunk_gla: a fast decoding path joins here behind its own device/shape check.
    return recurrent_gla_reference(q, k, v, g, scale=scale, initial_state=initial_state,
                                   output_final_state=output_final_state, cu_seqlens=cu_seqlens)
