"""Triton chunked GLA vs the reference: outputs, final states and every gradient.

The kernels run on CPU under TRITON_INTERPRET=1 in one subprocess (the interpreter must be set
before triton is imported), on CUDA when present, with every buffer pre-filled with NaN so an
element a kernel misses fails the test.
"""
import textwrap

import pytest
import torch

from ops.gla import chunk_gla
from ops.gla import triton_chunk as tc
from tests.helpers import run_triton_script


CASES = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from torch.testing import assert_close
    from ops.gla import chunk_gla
    from ops.gla import triton_chunk as tc
    DEVICE = "{device}"
    assert tc.fwd.INTERPRET == (DEVICE == "cpu")
    tc.NAN_FILL = True
    NAMES = ["o", "final_state", "dq", "dk", "dv", "dg", "dh0"]

    def inputs(B, T, Hq, Hkv, K, V, N, dtype, with_state, g, seed):
        gen = torch.Generator().manual_seed(seed)
        rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
        q, k, v = rand(B, T, Hq, K), rand(B, T, Hkv, K), rand(B, T, Hkv, V)
        if g is None:  # the 7B gate: logsigmoid(x) / 16, with a spread of rates
            g = F.logsigmoid(rand(B, T, Hkv, K) * 4) / 4
        leaves = [x.to(DEVICE, dtype) for x in (q, k, v, g)]
        h0 = rand(N, Hkv, K, V).float().to(DEVICE) if with_state else None
        return leaves, h0

    def run(backend, leaves, h0, cu, seed, final=True):
        # -> o, the final state (if asked for), the grads of a random loss on them
        leaves = [x.clone().requires_grad_() for x in leaves]
        h0 = h0.clone().requires_grad_() if h0 is not None else None
        o, ht = chunk_gla(*leaves, initial_state=h0, output_final_state=final, cu_seqlens=cu,
                          backend=backend)
        gen = torch.Generator().manual_seed(seed + 1)
        loss = (o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum()
        if final:
            loss = loss + (ht * torch.randn(ht.shape, generator=gen).to(ht.device)).sum()
        grads = torch.autograd.grad(loss, leaves + ([h0] if h0 is not None else []))
        return [o.detach()] + ([ht.detach()] if final else []) + [x.detach() for x in grads]

    def check(B, T, Hq, Hkv, K, V, *, cu=None, dtype=torch.float32, with_state=False, g=None,
              seed=0, tol=1e-4, dg_floor=0.0, final=True):
        N = len(cu) - 1 if cu is not None else B
        cu_t = torch.tensor(cu, dtype=torch.int32, device=DEVICE) if cu is not None else None
        leaves, h0 = inputs(B, T, Hq, Hkv, K, V, N, dtype, with_state, g, seed)
        got = run("triton", leaves, h0, cu_t, seed, final)
        ref = run("reference", leaves, h0, cu_t, seed, final)
        assert got[0].dtype == dtype and (not final or got[1].dtype == torch.float32)
        names = NAMES if final else NAMES[:1] + NAMES[2:]
        for name, x, y in zip(names, got, ref):
            assert x.dtype == y.dtype and x.shape == y.shape, (name, x.dtype, y.dtype)
            assert torch.isfinite(x).all(), (name, "not finite")
            x, y = x.float(), y.float()
            atol = tol * y.abs().max().item()
            if name == "dg":  # q.dq - k.dk: terms of dq and dk's size cancel (see the -30 case)
                atol = max(atol, dg_floor * ref[names.index("dk")].abs().max().item())
            where = f"{{name}} (B={{B}} T={{T}} G={{Hq // Hkv}} {{dtype}} cu={{cu}})"
            assert_close(x, y, rtol=tol, atol=atol, msg=lambda m: f"{{where}}: {{m}}")

    {cases}
    print("CASES OK")
""")

# Blocks of 16 channels make K = V = 32 use the kernels' multi-block paths.
CPU_CASES = """
    tc.FWD_BK = tc.BWD_BK = tc.BWD_BV = 16
    check(2, 67, 3, 1, 16, 16, with_state=True)                       # odd length, batch of 2
    check(2, 67, 3, 1, 16, 16, with_state=True, final=False)          # no final state asked for
    check(1, 150, 1, 1, 32, 16)                                       # G = 1, three chunks
    # documents of 1, 0, 8 and 141 tokens (the last spans three chunks), 2 blocks of channels
    check(1, 150, 6, 2, 32, 32, cu=[0, 1, 1, 9, 150], with_state=True)
    check(1, 150, 3, 1, 16, 16, cu=[0, 1, 1, 9, 150], with_state=True, dtype=torch.bfloat16, tol=3e-2)
    # strong decay: -100 in half the channels, then -30 everywhere (no overflow, still exact)
    g = torch.rand(1, 100, 2, 16, dtype=torch.float64) * -0.1
    g[..., ::2] = -100.0
    check(1, 100, 6, 2, 16, 16, cu=[0, 37, 100], with_state=True, g=g)
    # With -30 everywhere the reference's dg is ~1e-12: the i = j terms of q.dq and k.dk, of dk's
    # size, cancel exactly there (exp(0) has no g in it) and to float32 rounding here.
    check(1, 70, 3, 1, 16, 16, with_state=True, g=torch.full((1, 70, 1, 16), -30.0, dtype=torch.float64),
          dg_floor=1e-5)
    # Both forms of the diagonal blocks in one call: one channel closes (-100) at rows 20-40 only,
    # so the sub-chunks there go row by row and the others through the factorised dot.
    g = F.logsigmoid(torch.randn(1, 150, 2, 32, dtype=torch.float64)) / 16
    g[0, 20:40, :, 5] = -100.0
    check(1, 150, 6, 2, 32, 32, cu=[0, 9, 150], with_state=True, g=g)
    # Every diagonal block row by row (as a strong decay takes it), on the general cases.
    tc.fwd.SPAN_MAX = -1.0
    check(1, 150, 6, 2, 32, 32, cu=[0, 1, 1, 9, 150], with_state=True)
    check(1, 150, 3, 1, 16, 16, cu=[0, 1, 1, 9, 150], with_state=True, dtype=torch.bfloat16, tol=3e-2)
"""

GPU_CASES = """
    cu = [0, 1, 1, 700, 2100, 2101, 5000, 8192]  # 1-token and empty documents, ragged chunks
    check(1, 8192, 28, 4, 128, 128, cu=cu, with_state=True, dtype=torch.bfloat16, tol=3e-2)
    # float32 at K = V = 64: its tf32x3 dots take minutes to compile (and autotune) at 128
    check(1, 8192, 28, 4, 64, 64, cu=cu, with_state=True)
    check(2, 1000, 14, 2, 64, 64)
    g = torch.rand(1, 4096, 4, 128, dtype=torch.float64) * -0.1
    g[..., ::2] = -100.0
    check(1, 4096, 28, 4, 128, 128, cu=[0, 1000, 4096], g=g, dtype=torch.bfloat16, tol=3e-2)
    tc.fwd.SPAN_MAX = -1.0  # every diagonal block row by row
    check(1, 8192, 28, 4, 128, 128, cu=cu, with_state=True, dtype=torch.bfloat16, tol=3e-2)
    tc.fwd.SPAN_MAX = 40.0
    # 128k packed tokens, three documents: everything finite
    T = 131072
    leaves, h0 = inputs(1, T, 28, 4, 128, 128, 3, torch.bfloat16, True, None, 0)
    out = run("triton", leaves, h0, torch.tensor([0, 5, 70000, T], device=DEVICE), 0)
    assert all(torch.isfinite(x).all() for x in out)
"""


def _run_cases(device: str, cases: str, timeout: int):
    run_triton_script(CASES.format(device=device, cases=textwrap.dedent(cases).strip()), device, timeout)


def _interpreter_runs_loops() -> bool:
    """triton < 3.7's interpreter reads runtime loop bounds with int() of a 1-element array, which
    newer numpy refuses; the state passes loop over each document's chunks."""
    import numpy as np
    import triton
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 7):
        return True
    try:
        int(np.ones(1))
    except TypeError:
        return False
    return True


def test_triton_interpreted_matches_reference():
    if not _interpreter_runs_loops():
        pytest.skip("this triton's interpreter cannot run loops with runtime bounds under this numpy")
    _run_cases("cpu", CPU_CASES, timeout=600)


@pytest.mark.gpu
def test_triton_cuda_matches_reference():
    _run_cases("cuda", GPU_CASES, timeout=1200)


@pytest.mark.gpu
def test_triton_cuda_matches_fla_peer():
    pytest.importorskip("fla")
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 4096, 28, 128, device="cuda", generator=gen).bfloat16()
    k, v = (torch.randn(1, 4096, 4, 128, device="cuda", generator=gen).bfloat16() for _ in range(2))
    g = torch.nn.functional.logsigmoid(torch.randn(1, 4096, 4, 128, device="cuda", generator=gen)) / 16
    cu = torch.tensor([0, 1000, 4096], device="cuda")
    o, ht = chunk_gla(q, k, v, g, cu_seqlens=cu, output_final_state=True, backend="triton")
    o_fla, ht_fla = chunk_gla(q, k, v, g, cu_seqlens=cu, output_final_state=True, backend="fla")
    for x, y in ((o.float(), o_fla.float()), (ht, ht_fla)):  # both round to bfloat16 inside
        assert ((x - y).abs().max() / y.abs().max()).item() < 2e-2


def test_chunk_tables():
    cu = torch.tensor([0, 1, 1, 65, 200])  # lengths 1, 0, 64, 135
    tab, doc_off = tc.chunk_tables(cu, 200 // 64 + 4)
    assert doc_off.tolist() == [0, 1, 1, 2, 5]
    # (first row, valid rows, document, last chunk of its document)
    assert tab[:5].tolist() == [[0, 1, 0, 1], [1, 64, 2, 1], [65, 64, 3, 0], [129, 64, 3, 0],
                                [193, 7, 3, 1]]
    assert (tab[5:, 1] == 0).all()  # chunks past the real count have no rows


def _small():
    """q [1, 8, 2, 16], k/v/g [1, 8, 1, 16] on the CPU."""
    return (torch.randn(1, 8, 2, 16), torch.randn(1, 8, 1, 16), torch.randn(1, 8, 1, 16),
            -torch.rand(1, 8, 1, 16))


def test_dispatch_without_interpreter():
    from ops.gla import fla_peer
    q, k, v, g = _small()
    if not tc.fwd.INTERPRET:
        assert not tc.supports(q, k, v, g)  # CPU tensors take the reference
    assert not tc.supports(q.double(), k.double(), v.double(), g.double())
    o, _ = chunk_gla(q, k, v, g)
    o_ref, _ = chunk_gla(q, k, v, g, backend="reference")
    assert torch.equal(o, o_ref)
    with pytest.raises(ValueError, match="backend must be one of"):
        chunk_gla(q, k, v, g, backend="cuda")
    if not fla_peer.available():
        with pytest.raises(ImportError, match="pip install fla-core"):
            chunk_gla(q, k, v, g, backend="fla")


def test_device_checks_read_no_boundary_values():
    """Off the CPU the boundary values stay unread: a meta tensor has none to read."""
    q, k, v, g = _small()
    cu = torch.tensor([0, 3, 8], device="meta")
    assert tc.check_inputs(q, k, v, g, None, cu) == 2
    with pytest.raises(ValueError, match="requires batch size B == 1"):
        tc.check_inputs(*(x.expand(2, -1, -1, -1) for x in (q, k, v, g)), None, cu)
    with pytest.raises(ValueError, match=r"initial_state has shape .* expected \[N=2"):
        tc.check_inputs(q, k, v, g, torch.zeros(1, 1, 16, 16), cu)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        tc.check_inputs(q, k, v, g, None, cu.float())
