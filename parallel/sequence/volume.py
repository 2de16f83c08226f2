"""Bytes one rank sends for sequence parallelism in one training step (`launch/plan.py`).

Per layer and micro-batch, forward plus backward (each core's backward sends what its forward
did, in reverse): GLA layers send their states (LASP-2: every rank's fp32 final state and decay
to every other rank; all-scan: one state forward along the ring); softmax layers send the
Ulysses all-to-all or the halo, whichever `parallel.sp_softmax` picks (as the context does).
The hybrid (76B) layers do both. ZeRO's weight and gradient traffic is not counted here.
"""
from __future__ import annotations

from .halo import halo_volume
from .ulysses import ulysses_volume

GLA_STATE_BYTES = 4  # the chain runs in fp32


def gla_volume(*, rows: int, kv_heads: int, head_dim: int, sp: int, method: str) -> int:
    """Bytes one rank sends in one GLA layer's forward: LASP-2 all-gathers s [B, Hkv, K, K] and
    d [B, Hkv, K] (sp - 1 pieces out of every rank); the ring sends one state."""
    if sp == 1:
        return 0
    state, decay = rows * kv_heads * head_dim * head_dim, rows * kv_heads * head_dim
    if method == "allscan":
        return state * GLA_STATE_BYTES
    return (sp - 1) * (state + decay) * GLA_STATE_BYTES


def softmax_volume(*, window: int | None, rows: int, slice_len: int, q_heads: int, kv_heads: int,
                   head_dim: int, sp: int, method: str, element_size: int) -> tuple[str, int]:
    """(method used, bytes one rank sends) in one softmax layer's forward."""
    shapes = dict(rows=rows, slice_len=slice_len, kv_heads=kv_heads, head_dim=head_dim, sp=sp,
                  element_size=element_size)
    ulysses = ulysses_volume(q_heads=q_heads, **shapes)
    if window is None or method == "ulysses":
        return "ulysses", ulysses
    halo = halo_volume(window=window, **shapes)
    if method == "halo" or halo < ulysses:
        return "halo", halo
    return "ulysses", ulysses


def step_volume(cfg, micro_batch: int, micro_batches: int, element_size: int) -> dict:
    """cfg: RunConfig -> {"per_layer": [(mixer, method, bytes fwd+bwd per micro-batch)], "step":
    bytes per step} for one rank."""
    m, par = cfg.model, cfg.parallel
    sp, t_l = par.sp, cfg.data.seq_len // par.sp
    per_layer = []
    for mixer in m.mixers:
        sent, how = 0, []
        if mixer.startswith("gla"):
            sent += gla_volume(rows=micro_batch, kv_heads=m.num_kv_heads, head_dim=m.head_dim, sp=sp,
                               method=par.sp_linear)
            how.append(par.sp_linear)
        if mixer != "gla":
            window = None if mixer.endswith("full") else m.sliding_window
            method, n = softmax_volume(window=window, rows=micro_batch, slice_len=t_l, q_heads=m.num_heads,
                                       kv_heads=m.num_kv_heads, head_dim=m.head_dim, sp=sp,
                                       method=par.sp_softmax, element_size=element_size)
            sent += n
            how.append(method)
        per_layer.append((mixer, "+".join(how), 2 * sent))
    return {"per_layer": per_layer, "step": micro_batches * sum(n for *_, n in per_layer)}


def format_volume(volume: dict) -> str:
    """The step's SP traffic, one line per distinct layer kind."""
    kinds: dict[tuple[str, str], list[int]] = {}
    for mixer, how, n in volume["per_layer"]:
        kinds.setdefault((mixer, how), []).append(n)
    lines = ["sequence-parallel traffic per rank (forward + backward):"]
    lines += [f"  {len(ns)} x {mixer} ({how}): {ns[0] / 2**20:.1f} MiB per layer and micro-batch"
              for (mixer, how), ns in kinds.items()]
    lines.append(f"  per step: {volume['step'] / 2**30:.2f} GiB")
    return "\n".join(lines)
