"""Ulysses and window-halo softmax attention under SP equal unsplit attention (fp32, gloo ranks).

Rows of T = 16 tokens, B = 2, with packed documents crossing slice boundaries, 1-token
documents at a boundary and a document starting exactly at a slice start; windows inside a
slice and spanning several slices; sinks and none; KV heads divisible by sp and fewer KV heads
than ranks (replicated KV, padded query groups). Outputs and q/k/v gradients gathered from the
ranks, and the sink gradients summed over them, match `ops.attention.attention` on the unsplit
rows to 1e-5.
"""
from __future__ import annotations

import pytest
import torch

from ops.attention import attention
from parallel.sequence.halo import halo_attention, halo_hops, halo_volume
from parallel.sequence.ulysses import ulysses_attention, ulysses_layout, ulysses_volume
from tests.parallel.attn_workers import global_cu_seqlens, make_case, run_local
from tests.parallel.ranks import run_ranks

TOL = dict(atol=1e-5, rtol=1e-5)
# row 0: 1-token documents [3, 4) and [4, 5) around the sp=4 boundary 4, [5, 11) crossing 8,
# [11, 16) crossing 12; row 1: 1-token documents [7, 8) and [8, 9) on both sides of 8.
DOCS = [[0, 3, 4, 5, 11, 16], [0, 7, 8, 9, 16]]


def case(method, Hq, Hkv, window, S, docs=DOCS, seed=0, error=False):
    return dict(method=method, B=2, T=16, Hq=Hq, Hkv=Hkv, D=4, S=S, window=window, docs=docs,
                seed=seed, scale=0.7, error=error)


def reference(c: dict) -> dict:
    """Unsplit attention over the B rows: o, q/k/v grads [B, T, H, D], sink grads."""
    full = make_case(c)
    B, T = c["B"], c["T"]
    leaves = {n: (None if full[n] is None else full[n].clone().requires_grad_(True))
              for n in ("q", "k", "v", "sink_k", "sink_v")}
    cu = global_cu_seqlens(c)
    shape = (B, T) if cu is None else (1, B * T)
    q, k, v = (leaves[n].reshape(*shape, *leaves[n].shape[2:]) for n in ("q", "k", "v"))
    o = attention(q, k, v, window=c["window"], sink_k=leaves["sink_k"], sink_v=leaves["sink_v"],
                  cu_seqlens=cu, scale=c["scale"])
    (o.reshape(full["do"].shape) * full["do"]).sum().backward()
    grad = {n: None if leaves[n] is None else leaves[n].grad for n in leaves}
    return dict(o=o.detach().reshape(full["do"].shape), dq=grad["q"], dk=grad["k"], dv=grad["v"],
                dsink_k=grad["sink_k"], dsink_v=grad["sink_v"])


def check_gathered(c: dict, per_rank: list[dict]) -> None:
    """Slices concatenated along time, sink gradients summed over ranks, against `reference`."""
    want = reference(c)
    for name in ("o", "dq", "dk", "dv"):
        got = torch.cat([r[name] for r in per_rank], dim=1)
        torch.testing.assert_close(got, want[name], **TOL, msg=lambda m: f"{name} of {c}: {m}")
    for name in ("dsink_k", "dsink_v"):
        if want[name] is None:
            assert all(r[name] is None for r in per_rank)
        else:
            got = torch.stack([r[name] for r in per_rank]).sum(0)
            torch.testing.assert_close(got, want[name], **TOL, msg=lambda m: f"{name} of {c}: {m}")


@pytest.mark.parametrize("c", [case("ulysses", 4, 2, None, 2), case("ulysses", 6, 2, 3, 0),
                               case("halo", 4, 1, 3, 2), case("halo", 4, 2, 5, 0, docs=None)])
def test_world_of_one_is_plain_attention(c):
    check_gathered(c, [run_local(c, 0, 1, None)])


# sp=2 (T_l = 8) and sp=4 (T_l = 4); the ValueError cases come back as their message
CASES = {
    2: [case("ulysses", 4, 2, None, 2, seed=1),             # Hkv % sp == 0, full attention, sinks
        case("ulysses", 4, 1, 3, 0, seed=2),                # KV replicated x2, no padding
        case("ulysses", 3, 1, 5, 1, docs=None, seed=3),     # KV x2, group 3 padded to 4
        case("halo", 4, 2, 3, 2, seed=4),                   # window inside a slice, sinks
        case("halo", 4, 1, 11, 0, seed=5),                  # window longer than a slice
        case("halo", 4, 2, 5, 1, docs=None, seed=6),        # one document per row
        case("ulysses", 6, 3, None, 0, error=True)],                    # 3 KV heads on 2 ranks: error
    4: [case("ulysses", 6, 2, None, 2, seed=7),             # KV x2, groups of 3 padded to 4
        case("ulysses", 8, 4, 6, 0, seed=8),                # Hkv % sp == 0, window
        case("halo", 6, 2, 6, 2, seed=9),                   # halo across 2 ranks, sinks
        case("halo", 4, 2, 3, 0, seed=10),                  # window inside a slice
        case("halo", 4, 1, 20, 1, seed=11),                 # window beyond every earlier rank
        case("halo", 4, 2, 0, 1, seed=12),                  # window 0: no halo
        case("ulysses", 6, 3, 3, 0, error=True)],                       # 3 KV heads on 4 ranks: error
}


@pytest.mark.parametrize("sp", sorted(CASES))
def test_ranks_equal_unsplit_attention(sp):
    results = run_ranks(sp, "tests.parallel.attn_workers:run_cases", CASES[sp], timeout=300)
    for i, c in enumerate(CASES[sp]):
        per_rank = [r[i] for r in results]
        if c["error"]:
            assert all(f"parallel.sp={sp} " in m and "6 query / 3 KV heads" in m for m in per_rank)
        else:
            check_gathered(c, per_rank)


@pytest.mark.parametrize("Hq, Hkv, sp, want", [
    (28, 4, 2, (1, 7, 14, 2)), (28, 4, 4, (1, 7, 7, 1)), (28, 4, 8, (2, 8, 4, 1)),
    (6, 2, 4, (2, 4, 2, 1)), (4, 4, 8, (2, 2, 1, 1)), (8, 1, 8, (8, 8, 1, 1))])
def test_head_layout(Hq, Hkv, sp, want):
    """(replicas, padded group, query heads per rank, KV heads per rank); the 7B at sp 2, 4, 8."""
    lay = ulysses_layout(Hq, Hkv, sp)
    assert (lay.replicas, lay.padded_group, lay.q_per_rank, lay.kv_per_rank) == want
    assert lay.q_per_rank * sp == Hkv * lay.padded_group


@pytest.mark.parametrize("Hq, Hkv, sp", [(6, 3, 2), (6, 3, 4), (12, 3, 2), (12, 6, 4), (20, 10, 4)])
def test_head_layout_errors(Hq, Hkv, sp):
    with pytest.raises(ValueError, match=rf"parallel.sp={sp} .* {Hq} query / {Hkv} KV heads"):
        ulysses_layout(Hq, Hkv, sp)


def test_argument_errors():
    q, kv = torch.zeros(1, 8, 4, 4), torch.zeros(1, 8, 2, 4)
    kw = dict(sink_k=None, sink_v=None, scale=None, global_cu_seqlens=None, rows=2, group=None)
    with pytest.raises(ValueError, match="non-negative int window"):
        halo_attention(q, kv, kv, window=None, **kw)
    with pytest.raises(ValueError, match="rows=3"):
        ulysses_attention(q, kv, kv, window=None, **{**kw, "rows": 3})
    with pytest.raises(ValueError, match=r"q \[1, B\*T_l, Hq, D\]"):
        halo_attention(q, kv[:, :4], kv[:, :4], window=2, **kw)


def test_volumes():
    """Bytes per rank per layer: the 7B at 128k on sp 8 (window 4096) favours the halo."""
    dims = dict(rows=1, slice_len=16384, kv_heads=4, head_dim=128, sp=8)
    assert halo_hops(4096, 16384, 8) == [4096]
    assert halo_hops(10, 4, 4) == [4, 4, 2] and halo_hops(20, 4, 4) == [4, 4, 4]
    assert halo_volume(window=4096, **dims) == 4096 * 2 * 4 * 128 * 2
    # padded q + o: 2 x 32 heads, replicated k + v: 2 x 8 heads; 7/8 of it leaves the rank
    assert ulysses_volume(q_heads=28, **dims) == 16384 * 80 * 128 * 2 * 7 // 8
    assert ulysses_volume(q_heads=28, **{**dims, "sp": 1}) == 0 == halo_volume(window=64, **{**dims, "sp": 1})
