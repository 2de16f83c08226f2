"""The project's Triton attention against the reference: outputs and every gradient (q, k, v,
sinks), with windows, sinks, GQA, packed documents (empty and 1-token ones) and odd lengths.

The kernels run on CPU under TRITON_INTERPRET=1 in one subprocess (the interpreter must be set
before triton is imported) with 16-row tiles, so short rows reach the multi-tile paths; every
buffer the kernels write starts as NaN, so an element they miss fails the test. The `gpu` cases
at model shapes are in test_attention_fast.py (backend "triton").
"""
import textwrap

import torch

from ops.attention import triton_attn
from tests.helpers import run_triton_script

SCRIPT = textwrap.dedent("""
    import torch
    from ops.attention import attention, attention_reference
    from ops.attention import triton_attn as ta
    assert ta.INTERPRET
    ta.NAN_FILL = True

    def check(B, T, Hq, Hkv, D, window=None, S=0, cu=None, dtype=torch.float32, seed=0, tol=2e-4,
              scale=None):
        g = torch.Generator().manual_seed(seed)
        r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
        x = [r(B, T, Hq, D), r(B, T, Hkv, D), r(B, T, Hkv, D)] + ([r(S, Hkv, D), r(S, Hkv, D)] if S else [])
        cu_t = torch.tensor(cu) if cu is not None else None
        w = torch.randn(B, T, Hq, D, generator=g, dtype=torch.float64)
        got, want = [], []
        for backend, dt, out in (("triton", dtype, got), ("reference", torch.float64, want)):
            leaves = [t.to(dt).requires_grad_() for t in x]
            o = attention(*leaves[:3], window=window, sink_k=leaves[3] if S else None,
                          sink_v=leaves[4] if S else None, cu_seqlens=cu_t, scale=scale, backend=backend)
            out += [o.detach()] + list(torch.autograd.grad((o * w.to(dt)).sum(), leaves))
        for name, a, b in zip(["o", "dq", "dk", "dv", "dsink_k", "dsink_v"], got, want):
            assert a.dtype == dtype and a.shape == b.shape, name
            assert torch.isfinite(a).all(), (name, "not finite")
            # relative to the largest value (at least 1: window 0 makes dq and dk exactly 0)
            err = (a.double() - b).abs().max().item() / max(b.abs().max().item(), 1.0)
            assert err < tol, (name, err, dict(B=B, T=T, window=window, S=S, cu=cu, dtype=dtype))

    check(2, 37, 4, 2, 16)                                       # batch of 2, odd length, GQA 2
    check(1, 70, 4, 4, 16, window=9)                             # window shorter than a tile
    check(1, 70, 3, 1, 32, window=0)                             # window 0: each query sees itself
    check(1, 70, 2, 1, 16, window=20, S=5, cu=[0, 1, 1, 30, 70]) # 1-token and empty documents, sinks
    check(1, 70, 6, 2, 32, cu=[0, 17, 18, 70], S=19, scale=0.3)  # sinks over two tiles
    check(3, 40, 4, 2, 16, window=25, S=3)                       # sinks shared across the batch
    check(1, 70, 6, 2, 32, cu=[0, 17, 18, 70], window=40, S=2, dtype=torch.bfloat16, tol=3e-2)
    # the operators' registrations (schema, fake shapes, autograd) against their real runs
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(*s, generator=g) for s in ((20, 4, 16), (20, 2, 16), (20, 2, 16), (3, 2, 16), (3, 2, 16))]
    lo, hi = ta.row_bounds(torch.tensor([0, 7, 20]), 20, 5)
    for sinks in (x[3:], [None, None]):
        leaves = [t.requires_grad_() if t is not None else None for t in x[:3] + sinks]
        torch.library.opcheck(ta.attention_fwd, (*leaves, lo, hi, 0.25),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    print("CASES OK")
""")


def test_triton_attention_interpreted_matches_reference():
    run_triton_script(SCRIPT, "cpu", timeout=600)


def test_meta_tensors_get_the_kernels_buffers():
    """On meta tensors (the memory planner's replay) the operators' fake implementations give
    every output and gradient its shape and dtype, and nothing launches."""
    q = torch.empty(1, 300, 6, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.empty(1, 300, 2, 64, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
    sk, sv = (torch.empty(5, 2, 64, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
    cu = torch.tensor([0, 100, 300], device="meta")
    out = triton_attn.attention_triton(q, k, v, window=50, sink_k=sk, sink_v=sv, cu_seqlens=cu)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device.type == "meta"
    out.sum().backward()
    assert all(t.grad.shape == t.shape and t.grad.dtype == t.dtype for t in (q, k, v, sk, sv))


def test_row_bounds_are_the_visibility_rules():
    """lo[i] and hi[j] from cu_seqlens and the window say exactly what visibility_mask says."""
    from ops.attention import visibility_mask
    cu = torch.tensor([0, 1, 1, 9, 30, 31, 64])
    for window in (None, 0, 3, 100):
        lo, hi = triton_attn.row_bounds(cu, 64, window)
        mask = visibility_mask(64, window=window, cu_seqlens=cu)
        i, j = torch.arange(64)[:, None], torch.arange(64)[None, :]
        assert torch.equal((lo[:, None] <= j) & (j <= i), mask)
        assert torch.equal((j[0][:, None] <= i[:, 0][None, :]) & (i[:, 0][None, :] <= hi[:, None]),
                           mask.T)
