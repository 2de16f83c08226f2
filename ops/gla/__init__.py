"""Gated linear attention (GLA): public entry points that pick an implementation per call.

Layout is time-major: q [B, T, Hq, K], k/g [B, T, Hkv, K], v [B, T, Hkv, V], with g <= 0 the
per-channel log-decay and Hq a multiple of Hkv (GQA groups share one state per KV head). See
`ops.gla.reference` for the exact semantics, which every implementation must reproduce.
"""
import functools

import torch

from . import fla_peer
from .reference import chunk_gla_reference, recurrent_gla_reference

try:
    from . import triton_chunk
except ImportError:  # no triton on this machine: fla or the reference serve every call
    triton_chunk = None

__all__ = ["chunk_gla", "recurrent_gla"]
BACKENDS = ("reference", "triton", "fla")


@functools.cache
def _fla_available() -> bool:
    return fla_peer.available()


def _auto_backend(q, k, v, g, initial_state, cu_seqlens) -> str:
    if q.is_cuda and triton_chunk is not None and triton_chunk.supports(q, k, v, g, initial_state,
                                                                        cu_seqlens):
        return "triton"
    if q.is_cuda and q.dtype != torch.float64 and _fla_available():
        return "fla"
    return "reference"


def chunk_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *,
              scale: float | None = None, initial_state: torch.Tensor | None = None,
              output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
              chunk_size: int = 16, backend: str | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked GLA for training.

    backend: "reference" (pure PyTorch, any device), "triton" (own GQA-native kernels,
    `ops.gla.triton_chunk`), "fla" (fla-core with k, v, g repeated per query head); None picks
    triton on CUDA where `triton_chunk.supports` says so, else fla on CUDA if installed, else the
    reference.

    chunk_size only trades speed for memory in the reference (the result is the same; the Triton
    kernels always use 64): its intra-chunk work grows linearly with it, and 16 was fastest on
    CPU at T=256 (8: 0.098 s, 16: 0.090 s, 64: 0.53 s for forward+backward of B=16, Hkv=2, K=32).

    q [B, T, Hq, K], k/g [B, T, Hkv, K], v [B, T, Hkv, V], initial_state [N, Hkv, K, V],
    cu_seqlens [N+1] cumulative document lengths along T (requires B == 1)
    -> o [B, T, Hq, V] in q's dtype, final_state [N, Hkv, K, V] float32 (float64 for float64 q) or None.
    scale defaults to K ** -0.5.
    """
    if backend is None:
        backend = _auto_backend(q, k, v, g, initial_state, cu_seqlens)
    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                  cu_seqlens=cu_seqlens)
    if backend == "reference":
        return chunk_gla_reference(q, k, v, g, chunk_size=chunk_size, **kwargs)
    if backend == "triton":
        if triton_chunk is None:
            raise ImportError("chunk_gla backend 'triton' needs triton: pip install triton")
        return triton_chunk.chunk_gla_triton(q, k, v, g, **kwargs)
    if backend == "fla":
        return fla_peer.chunk_gla_fla(q, k, v, g, **kwargs)
    raise ValueError(f"chunk_gla: backend must be one of {BACKENDS} or None, got {backend!r}")


def recurrent_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *,
                  scale: float | None = None, initial_state: torch.Tensor | None = None,
                  output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step-by-step GLA (decoding, short inputs); same shapes and semantics as `chunk_gla`."""
    # As in chunk_gla: a fast decoding path joins here behind its own device/shape check.
    return recurrent_gla_reference(q, k, v, g, scale=scale, initial_state=initial_state,
                                   output_final_state=output_final_state, cu_seqlens=cu_seqlens)
