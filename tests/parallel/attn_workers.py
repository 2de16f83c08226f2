"""What the ranks of the Ulysses / halo attention tests run (importable by spawned processes).

A case is a dict: method ("ulysses" | "halo"), B, T, Hq, Hkv, D, S (sinks, 0 = none), window
(int or None), docs (per-row document boundaries, e.g. [[0, 3, 16], [0, 16]], or None), seed,
scale, error (True: the case must raise a ValueError).
`make_case` builds the full (unsplit) tensors the same way on every rank and in the test.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def global_cu_seqlens(case: dict) -> torch.Tensor | None:
    """int32 [M+1] over the B * T tokens from the per-row boundaries (row starts included)."""
    if case["docs"] is None:
        return None
    T, bounds = case["T"], [0]
    for b, row in enumerate(case["docs"]):
        bounds += [b * T + x for x in row[1:]]
    return torch.tensor(bounds, dtype=torch.int32)


def make_case(case: dict) -> dict:
    """Full inputs: q [B, T, Hq, D], k/v [B, T, Hkv, D], sinks [S, Hkv, D] or None, do (the
    output gradient) like q; float32, from case["seed"]."""
    gen = torch.Generator().manual_seed(case["seed"])
    B, T, Hq, Hkv, D, S = (case[n] for n in ("B", "T", "Hq", "Hkv", "D", "S"))

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    out = dict(q=randn(B, T, Hq, D), k=randn(B, T, Hkv, D), v=randn(B, T, Hkv, D), do=randn(B, T, Hq, D))
    out["sink_k"], out["sink_v"] = (randn(S, Hkv, D), randn(S, Hkv, D)) if S else (None, None)
    return out


def run_local(case: dict, rank: int, sp: int, group) -> dict:
    """This rank's slice through ulysses/halo_attention and back: its o, q/k/v grads (slices,
    [B, T_l, H, D]) and its (partial) sink grads."""
    from parallel.sequence.halo import halo_attention
    from parallel.sequence.ulysses import ulysses_attention

    full = make_case(case)
    B, T = case["B"], case["T"]
    T_l = T // sp
    cut = slice(rank * T_l, (rank + 1) * T_l)

    def local(x):
        return x[:, cut].reshape(1, B * T_l, *x.shape[2:]).clone().requires_grad_(True)

    q, k, v = local(full["q"]), local(full["k"]), local(full["v"])
    sinks = [s.clone().requires_grad_(True) if s is not None else None
             for s in (full["sink_k"], full["sink_v"])]
    fn = ulysses_attention if case["method"] == "ulysses" else halo_attention
    o = fn(q, k, v, window=case["window"], sink_k=sinks[0], sink_v=sinks[1], scale=case.get("scale"),
           global_cu_seqlens=global_cu_seqlens(case), rows=B, group=group)
    (o * full["do"][:, cut].reshape(o.shape)).sum().backward()

    def back(x):
        return x.detach().reshape(B, T_l, *x.shape[2:])

    return dict(o=back(o), dq=back(q.grad), dk=back(k.grad), dv=back(v.grad),
                dsink_k=None if sinks[0] is None else sinks[0].grad.clone(),
                dsink_v=None if sinks[1] is None else sinks[1].grad.clone())


def run_cases(cases: list[dict]) -> list:
    """Every case on this rank (the world is the SP group); for a case marked `error`, the
    ValueError it raises (before any collective, on every rank) becomes its message."""
    dist.init_process_group("gloo")
    group, rank, sp = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    results = []
    for case in cases:
        if not case.get("error"):
            results.append(run_local(case, rank, sp, group))
            continue
        try:
            run_local(case, rank, sp, group)
            results.append(None)
        except ValueError as err:
            results.append(str(err))
    return results
