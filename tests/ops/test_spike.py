"""Spike quantisation: reference rules on known inputs, STE gradient, dispatcher, Triton kernel vs
reference (CPU under TRITON_INTERPRET=1 in a subprocess; CUDA when present)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ops.spike import SpikeResult, spike_quantize
from ops.spike.reference import STAT_NAMES, spike_quantize_reference, spike_stats_reference

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_known_values():
    x = torch.tensor([[1.0, -2.0, 3.0, 6.0]])
    r = spike_quantize(x, 3.0, return_counts=True)
    assert r.v_th.tolist() == [[1.0]] and r.counts.tolist() == [[1, -2, 3, 6]]
    assert torch.equal(r.out, x)
    r = spike_quantize(x, 2.0, return_counts=True)  # V_th = 1.5
    assert r.v_th.tolist() == [[1.5]] and r.counts.tolist() == [[1, -1, 2, 4]]
    assert r.out.tolist() == [[1.5, -1.5, 3.0, 6.0]]


def test_round_half_to_even():
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, 3.5, -2.5, 1.0, 0.5]])  # sum |x| = 12.5, D = 8
    r = spike_quantize(x, 12.5 / 8, return_counts=True)
    assert r.v_th.item() == 1.0
    assert r.counts.tolist() == [[0, 2, 2, 0, 4, -2, 1, 0]]


def test_clamps():
    x = torch.stack([torch.zeros(5), torch.full((5,), 1e-7), torch.full((5,), 1e6)])
    r = spike_quantize(x, return_counts=True, stats=True)
    assert r.v_th.flatten().tolist() == pytest.approx([1e-5, 1e-5, 1e4], rel=1e-7)
    assert r.counts.tolist() == [[0] * 5, [0] * 5, [100] * 5]
    assert r.out[:2].eq(0).all() and torch.equal(r.out[2], x[2])
    assert {k: v.item() for k, v in r.stats.items()} == {"numel": 15, "zeros": 10, "abs_sum": 500,
                                                         "le7": 10}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_and_counts_times_threshold(dtype):
    x = (torch.randn(3, 5, 37) * 2).to(dtype)
    r = spike_quantize(x, return_counts=True)
    assert r.out.dtype == dtype and r.out.shape == x.shape
    assert r.counts.dtype == torch.int32 and r.counts.shape == x.shape
    assert r.v_th.dtype == torch.float32 and r.v_th.shape == (3, 5, 1)
    assert torch.equal(r.out, (r.counts.float() * r.v_th).to(dtype))
    assert isinstance(spike_quantize(x), torch.Tensor)
    if dtype == torch.float32:  # counts times threshold is the output with no rounding step
        assert torch.equal(r.counts * r.v_th, r.out)


def test_fp64_input_uses_float32_threshold():
    x = torch.randn(4, 9, dtype=torch.float64)
    r = spike_quantize(x, return_counts=True)
    ref = spike_quantize(x.float(), return_counts=True)
    assert r.out.dtype == torch.float64 and torch.equal(r.counts, ref.counts)
    assert torch.equal(r.v_th, ref.v_th)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_straight_through_gradient(dtype):
    x = torch.randn(2, 3, 11, dtype=dtype, requires_grad=True)
    g = torch.randn(2, 3, 11, dtype=dtype)
    r = spike_quantize(x, return_counts=True, stats=True)
    assert not r.counts.requires_grad and not r.v_th.requires_grad
    r.out.backward(g)
    assert x.grad.dtype == dtype and torch.equal(x.grad, g)


def test_larger_k_gives_larger_counts_and_fewer_zeros():
    torch.manual_seed(0)
    x = torch.randn(64, 256)
    res = [spike_quantize(x, k, stats=True).stats for k in (2.0, 3.0, 4.0)]
    zeros = [s["zeros"].item() for s in res]
    abs_sum = [s["abs_sum"].item() for s in res]
    assert zeros[0] > zeros[1] > zeros[2] and abs_sum[0] < abs_sum[1] < abs_sum[2]
    # sum |s| ~ D * k per row, since sum |x| / V_th = D * k
    for k, a in zip((2, 3, 4), abs_sum):
        assert a == pytest.approx(64 * 256 * k, rel=0.1)


def test_stats_reference_counts():
    counts = torch.tensor([[0.0, -8.0, 7.0], [3.0, 0.0, -1.0]])
    assert spike_stats_reference(counts).tolist() == [6, 2, 19, 5]


def _spiked(return_counts, stats):
    """A small function around spike_quantize: its tensors, unused ones None."""
    def fn(x):
        r = spike_quantize(x * 2.0, 2.5, return_counts=return_counts, stats=stats)
        if not (return_counts or stats):
            return r.sin(), None, None, None
        summary = torch.stack([r.stats[n] for n in STAT_NAMES]) if stats else None
        return r.out.sin(), r.counts, r.v_th, summary
    return fn


@pytest.mark.parametrize("return_counts, stats", [(False, False), (True, False), (False, True), (True, True)])
def test_compiles_without_graph_break(return_counts, stats):
    """fullgraph=True turns a graph break into an error; outputs and gradient are eager's."""
    torch._dynamo.reset()
    fn = _spiked(return_counts, stats)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x, g = torch.randn(3, 4, 19), torch.randn(3, 4, 19)
    results = []
    for f in (fn, compiled):
        xi = x.clone().requires_grad_(True)
        outs = f(xi)
        outs[0].backward(g)
        results.append((outs, xi.grad))
    torch._dynamo.reset()
    (eager, grad_e), (comp, grad_c) = results
    for e, c in zip(eager, comp):
        assert (e is None) == (c is None)
        if e is not None:
            assert c.dtype == e.dtype and c.shape == e.shape and torch.equal(c.detach(), e.detach())
    assert all(t is None or not t.requires_grad for t in comp[1:])
    # straight through the spike: d sin(spike(2x)) / dx = 2 cos(spike(2x))
    assert torch.equal(grad_c, grad_e)
    assert torch.equal(grad_e, g * spike_quantize(x * 2.0, 2.5).cos() * 2.0)


def test_meta_device():
    """The memory planner replays steps on meta tensors: right shapes and dtypes, and a gradient."""
    x = torch.empty(2, 5, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    r = spike_quantize(x, return_counts=True, stats=True)
    assert r.out.device.type == "meta" and r.out.shape == x.shape and r.out.dtype == torch.bfloat16
    assert r.counts.shape == x.shape and r.counts.dtype == torch.int32
    assert r.v_th.shape == (2, 5, 1) and r.v_th.dtype == torch.float32
    assert list(r.stats) == list(STAT_NAMES)
    assert all(v.shape == () and v.dtype == torch.int64 for v in r.stats.values())
    r.out.backward(torch.empty_like(r.out))
    assert x.grad.shape == x.shape and x.grad.dtype == torch.bfloat16
    out = spike_quantize(x)
    assert out.device.type == "meta" and out.shape == x.shape


@pytest.mark.parametrize("want_counts, want_stats", [(False, False), (True, True)])
def test_opcheck(want_counts, want_stats):
    """The operator's schema, fake (meta) implementation and autograd registration agree with its
    implementation (torch.library.opcheck)."""
    from ops.spike import _spike_op

    x = torch.randn(3, 2, 13, requires_grad=True)
    torch.library.opcheck(_spike_op, (x, 3.0, 1e-5, 1e4, want_counts, want_stats))
    # a non-contiguous input: the outputs are laid out as the fake implementation says
    xt = torch.randn(13, 3, requires_grad=True).t()
    torch.library.opcheck(_spike_op, (xt, 2.0, 1e-5, 1e4, want_counts, want_stats),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


KERNEL_CHECK = textwrap.dedent("""
    import math, torch
    from ops.spike import spike_quantize
    from ops.spike import triton_kernel as tk
    from ops.spike.reference import spike_quantize_reference, spike_stats_reference
    DEVICE = "{device}"
    assert tk.INTERPRET == (DEVICE == "cpu")

    def run(x, k=3.0):
        out = torch.full_like(x, math.nan)  # an element the kernel misses stays NaN
        o, c, v, s = tk.spike_quantize_triton(x, k, 1e-5, 1e4, want_counts=True, want_stats=True, out=out)
        assert o.data_ptr() == out.data_ptr() and not o.isnan().any()
        ro, rc, rv = spike_quantize_reference(x.cpu(), k, 1e-5, 1e4)
        return o.cpu(), c.cpu(), v.cpu(), s.cpu(), ro, rc, rv

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for D in {dims}:
            for rows in ((1,), (3,), (2, 5)):
                # Multiples of 1/8: every row sum is exact in any order, so all outputs are bitwise equal.
                x = (torch.randint(-64, 65, (*rows, D)) / 8).to(dtype).to(DEVICE)
                x.view(-1, D)[0] = 0  # zero row: V_th clamped to v_min
                if x.numel() > D:
                    x.view(-1, D)[-1] = 1e6  # V_th clamped to v_max
                for k in (2.0, 3.0):
                    o, c, v, s, ro, rc, rv = run(x, k)
                    assert torch.equal(v, rv), (dtype, D, rows, k)
                    assert torch.equal(c, rc.to(torch.int32)) and torch.equal(o, ro), (dtype, D, rows, k)
                    assert torch.equal(s, spike_stats_reference(rc)), (s, spike_stats_reference(rc))
                # Random data: the |x| sum order differs from torch's, so V_th may differ in the last
                # bit; everything downstream must still follow the rules from the kernel's own V_th.
                x = (torch.randn(*rows, D) * 3).to(dtype).to(DEVICE)
                o, c, v, s, ro, rc, rv = run(x)
                torch.testing.assert_close(v, rv, rtol=3e-7, atol=0)
                assert torch.equal(c, torch.round(x.cpu().float() / v).to(torch.int32))
                assert torch.equal(o, (c.float() * v).to(dtype))
                assert torch.equal(s, spike_stats_reference(c.float()))

    # The dispatcher takes the kernel here, and the gradient stays straight-through.
    x = torch.randn(4, 130, device=DEVICE, requires_grad=True)
    assert tk.supports(x)
    r = spike_quantize(x, return_counts=True, stats=True)
    r.out.backward(torch.ones_like(x))
    assert torch.equal(x.grad, torch.ones_like(x))
    assert r.stats["numel"].item() == 4 * 130
    print("KERNEL OK")
""")


def test_triton_kernel_interpreted_matches_reference():
    pytest.importorskip("triton")
    script = KERNEL_CHECK.format(device="cpu", dims=(1, 7, 130, 1000, 4097 + 3))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "KERNEL OK" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.gpu
def test_triton_kernel_cuda_matches_reference():
    pytest.importorskip("triton")
    script = KERNEL_CHECK.format(device="cuda", dims=(1, 7, 130, 1000, 3584, 4100, 18944))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "KERNEL OK" in proc.stdout, proc.stdout + proc.stderr


def test_dispatcher_uses_reference_on_cpu_without_interpreter():
    from ops.spike import triton_kernel
    if triton_kernel is not None and triton_kernel.INTERPRET:
        pytest.skip("TRITON_INTERPRET is set for this process")
    x = torch.randn(3, 17)
    assert triton_kernel is None or not triton_kernel.supports(x)
    r = spike_quantize(x, return_counts=True)
    ro, rc, rv = spike_quantize_reference(x, 3.0, 1e-5, 1e4)
    assert isinstance(r, SpikeResult) and torch.equal(r.out, ro) and torch.equal(r.v_th, rv)
