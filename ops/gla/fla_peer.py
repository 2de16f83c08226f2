"""fla-core's chunked GLA behind this project's GQA interface: the benchmark peer of the own
Triton kernels, and the CUDA fallback where they do not apply.

fla keeps one state per query head, so k, v, g (and the initial state) are repeated to the Hq
query heads first; every copy of a KV head's state evolves identically, and the first copy of
each group is returned as the KV head's final state.
"""
import torch


def _fla_chunk_gla():
    try:
        from fla.ops.gla import chunk_gla
    except ImportError as err:
        raise ImportError("ops.gla backend 'fla' needs fla-core: pip install fla-core") from err
    return chunk_gla


def available() -> bool:
    """Whether fla-core can be imported here."""
    try:
        _fla_chunk_gla()
    except ImportError:
        return False
    return True


def chunk_gla_fla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *,
                  scale: float | None = None, initial_state: torch.Tensor | None = None,
                  output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q [B, T, Hq, K], k/g [B, T, Hkv, K], v [B, T, Hkv, V], initial_state [N, Hkv, K, V],
    cu_seqlens [N+1] (B == 1) -> o [B, T, Hq, V] in q's dtype, final_state [N, Hkv, K, V]
    float32 or None (fla's dtype rules apply)."""
    fla_chunk_gla = _fla_chunk_gla()
    # The reference's checks (without reading cu_seqlens off the GPU); fla itself needs triton.
    from .triton_chunk import check_inputs
    check_inputs(q, k, v, g, initial_state, cu_seqlens)
    Hkv = k.shape[2]
    G = q.shape[2] // Hkv
    k, v, g = (x.repeat_interleave(G, dim=2) for x in (k, v, g))
    if initial_state is not None:
        initial_state = initial_state.repeat_interleave(G, dim=1)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(torch.long)
    o, ht = fla_chunk_gla(q, k, v, g, scale=scale, initial_state=initial_state,
                          output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    if ht is not None:
        ht = ht.unflatten(1, (Hkv, G))[:, :, 0]
    return o, ht
