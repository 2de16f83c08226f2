"""The Triton logit gradient (`ops.loss.triton_ce`) against the PyTorch chunk it replaces, and the
chunked loss on its CUDA path (kernel, fp32-output addmm) against the plain path.

The kernel runs on CPU under TRITON_INTERPRET=1 in one subprocess (the interpreter must be set
before triton is imported), where `linear_cross_entropy` also takes its kernel path; on CUDA
when present. The interpreter rounds float32 to 16 bits toward zero where a GPU rounds to
nearest even, so there a 16-bit gradient may sit one unit in the last place from PyTorch's.
"""
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ops
import ops.loss as L
from ops.loss import linear_cross_entropy, linear_cross_entropy_reference, triton_ce
from tests.helpers import run_triton_script


CASES = textwrap.dedent("""
    import torch
    from torch.testing import assert_close
    import ops.loss as L
    from ops.loss import linear_cross_entropy, linear_cross_entropy_reference, triton_ce as tc
    DEVICE = "{device}"
    assert tc.INTERPRET == (DEVICE == "cpu")

    def torch_chunk(x, y, ignore_index):
        # ops.loss's PyTorch chunk on logits x [C, V]: loss sum, fp32 softmax - onehot (ignored rows 0)
        valid = y != ignore_index
        safe = torch.where(valid, y, 0).unsqueeze(1)
        logp = torch.log_softmax(x, 1, dtype=torch.float32)
        loss = -(logp.gather(1, safe).squeeze(1) * valid).sum()
        grad = logp.exp().scatter_add(1, safe, torch.full_like(safe, -1.0, dtype=torch.float32))
        return loss, grad * valid.unsqueeze(1)

    def ulps_apart(a, b):
        # 16-bit values: distance in units in the last place (same-sign values; +0 == -0)
        bits = lambda t: t.view(torch.int16).int()
        return torch.where(a == b, 0, (bits(a) - bits(b)).abs())

    def check(C, V, dtype, *, scale=3.0, ignored_every=5, block=None, pad=0, seed=0, edit=None,
              ignore_index=-100):
        gen = torch.Generator().manual_seed(seed)
        wide = (torch.randn(C, V + pad, generator=gen, dtype=torch.float64) * scale).to(dtype)
        y = torch.randint(0, V, (C,), generator=gen)
        y[1 % C], y[2 % C] = 0, V - 1  # the first and the last column
        if ignored_every:
            y[::ignored_every] = ignore_index
        if edit is not None:
            edit(wide, y)
        wide, y = wide.to(DEVICE), y.to(DEVICE)
        x = wide[:, :V]  # rows V + pad apart
        want_loss, want = torch_chunk(x, y, ignore_index)
        got = wide.clone()
        loss = tc.logit_grad_(got[:, :V], y, ignore_index, block=block)
        where = f"C={{C}} V={{V}} {{dtype}} block={{block}} scale={{scale}}"
        assert loss.dtype == torch.float32 and loss.dim() == 0, where
        assert torch.equal(got[:, V:], wide[:, V:]), where  # past a row's end nothing is written
        g = got[:, :V]
        assert g.dtype == dtype and torch.isfinite(g).all() and torch.isfinite(loss), where
        assert not g[(y == ignore_index).nonzero()].any(), where  # ignored rows: zeros
        assert_close(loss, want_loss, rtol=1e-5, atol=1e-5, msg=lambda m: f"{{where}}: {{m}}")
        if dtype == torch.float32:
            assert_close(g, want, rtol=1e-5, atol=2e-6, msg=lambda m: f"{{where}}: {{m}}")
        else:  # the fp32 gradient rounded once to the logits' dtype, as PyTorch rounds it
            apart = ulps_apart(g, want.to(dtype))
            assert apart.max() <= 1, (where, apart.max())
            if DEVICE != "cpu":
                assert (apart == 0).float().mean() > 0.99, where

    {cases}
    print("CASES OK")
""")

KERNEL_CASES = """
    for dtype in (torch.float32, torch.bfloat16):
        check(64, 3000, dtype, block=1024)                 # two full blocks and a partial one
        check(64, 3000, dtype, block=1024, pad=5)          # rows further apart than V
        check(16, 1000, dtype)                             # one block wider than the row
        check(32, 2048, dtype, block=512, scale=1e4)       # large logits: no overflow, no NaN
        check(8, 1500, dtype, block=512, ignored_every=1)  # every row ignored: loss 0, zeros
    check(32, 1200, torch.float16, block=256)
    check(8, 1200, torch.float32, block=256, ignore_index=7, ignored_every=3)  # a class id as the ignore value
    # -inf logits, filling a whole first block of row 0: finite loss and gradient
    def mask(x, y):
        x[0, :600] = float("-inf")
        y[0] = 900
    check(8, 1200, torch.float32, block=256, edit=mask)
    check(8, 1200, torch.bfloat16, block=256, edit=mask)
    # a target outside [0, V) that is not the ignore value: a NaN loss
    x = torch.randn(4, 100, device=DEVICE)
    y = torch.tensor([0, 100, 5, -100], device=DEVICE)
    assert tc.logit_grad_(x, y).isnan()
"""

# the whole op on the kernel path: fp32 against the plain path, bf16 autocast against the fp64 truth
OP_CASES = """
    assert L._fused(torch.empty(1, device=DEVICE))

    def problem(n, d, v, ignored_every=5, seed=0):
        gen = torch.Generator().manual_seed(seed)
        h, w = torch.randn(n, d, generator=gen), torch.randn(v, d, generator=gen) * 0.3
        y = torch.randint(0, v, (n,), generator=gen)
        if ignored_every:
            y[::ignored_every] = -100
        return h.to(DEVICE), w.to(DEVICE), y.to(DEVICE)

    def loss_and_grads(fn, h, w, y, autocast=False, **kw):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = fn(h, w, y, **kw)
        (0.37 * loss).backward()
        return loss.detach(), h.grad, w.grad

    rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())
    h, w, y = problem(*{shape})
    ref = loss_and_grads(linear_cross_entropy_reference, h, w, y)
    out = loss_and_grads(linear_cross_entropy, h, w, y, chunk_tokens={chunk})
    assert_close(out[0], ref[0], rtol=1e-5, atol=0)
    assert all(rel(a, b) < 1e-5 for a, b in zip(out[1:], ref[1:])), [rel(a, b) for a, b in zip(out[1:], ref[1:])]
    exact = loss_and_grads(linear_cross_entropy_reference, h.double(), w.double(), y)
    plain = loss_and_grads(linear_cross_entropy_reference, h, w, y, autocast=True)
    out = loss_and_grads(linear_cross_entropy, h, w, y, autocast=True, chunk_tokens={chunk})
    assert_close(out[0], plain[0], rtol=1e-5, atol=0)
    for got, p, truth in zip(out[1:], plain[1:], exact[1:]):
        assert got.dtype == torch.float32 and 1e-4 < rel(p, truth) < 1e-2
        assert rel(got, truth) < {bound} * rel(p, truth), (rel(got, truth), rel(p, truth))
    h, w, _ = problem(*{shape})
    loss, gh, gw = loss_and_grads(linear_cross_entropy, h, w, torch.full_like(y, -100), chunk_tokens={chunk})
    assert loss.item() == 0.0 and not gh.any() and not gw.any()
"""


def _run_cases(device: str, cases: str, timeout: int):
    run_triton_script(CASES.format(device=device, cases=textwrap.dedent(cases).strip()), device, timeout)


def test_kernel_interpreted_matches_the_torch_chunk():
    # truncation to bf16 (see the module docstring) costs the gradients about 1.5x the plain error
    op = OP_CASES.format(shape=(203, 48, 611), chunk=64, bound=2.5)
    _run_cases("cpu", KERNEL_CASES + op, timeout=300)


@pytest.mark.gpu
def test_kernel_cuda_matches_the_torch_chunk():
    cases = KERNEL_CASES + """
    check(1024, 152064, torch.bfloat16)  # the 7B vocabulary at the default block
    check(256, 152064, torch.float32, scale=30.0)
    """ + OP_CASES.format(shape=(3000, 256, 50000), chunk=1024, bound=1.5)
    _run_cases("cuda", cases, timeout=600)


def test_meta_returns_a_loss_and_launches_nothing():
    x = torch.empty(6, 1000, device="meta", dtype=torch.bfloat16)
    loss = triton_ce.logit_grad_(x, torch.zeros(6, dtype=torch.int64, device="meta"))
    assert loss.device.type == "meta" and loss.dtype == torch.float32 and loss.dim() == 0


@pytest.mark.parametrize("bad, message", [
    (dict(x=torch.zeros(4, 10, dtype=torch.float64)), "logits"),
    (dict(x=torch.zeros(10, 4).t()), "contiguous"),
    (dict(y=torch.zeros(5, dtype=torch.long)), "targets"),
    (dict(y=torch.zeros(4, dtype=torch.int32)), "int64"),
])
def test_bad_inputs_are_named(bad, message):
    args = dict(x=torch.zeros(4, 10), y=torch.zeros(4, dtype=torch.long))
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        triton_ce.logit_grad_(args["x"], args["y"])


class Shapes(TorchDispatchMode):
    """(op name, dtype, shape) of everything aten returns."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.made.append((func.overloadpacket.__name__, t.dtype, tuple(t.shape)))
        return out


@pytest.mark.parametrize("as_cuda", [True, False])
def test_meta_follows_the_path_of_the_device_it_stands_for(as_cuda):
    """What the memory planner sees: inside `meta_as_cuda` (CUDA) a chunk makes its logits in the
    compute dtype and nothing else of [C, V], and d W's share goes into the fp32 buffer without
    a [V, D] product; outside (CPU) the fp32 log-softmax and the product are there."""
    n, d, v, chunk = 300, 32, 1000, 128
    h = torch.empty(n, d, device="meta", dtype=torch.bfloat16, requires_grad=True)
    w = torch.empty(v, d, device="meta", dtype=torch.bfloat16, requires_grad=True)
    y = torch.zeros(n, dtype=torch.int64, device="meta")
    with Shapes() as mode, (L.meta_as_cuda() if as_cuda else torch.enable_grad()):
        linear_cross_entropy(h, w, y, chunk_tokens=chunk).backward()
    rows = {chunk, n % chunk}
    wide = [(dtype, shape) for _, dtype, shape in mode.made if len(shape) == 2 and shape[0] in rows and shape[1] == v]
    products = [op for op, dtype, shape in mode.made if shape == (v, d) and dtype == torch.bfloat16 and op == "mm"]
    assert w.grad is not None and h.grad is not None
    if as_cuda:
        assert {dtype for dtype, _ in wide} == {torch.bfloat16} and len(wide) == 3  # one per chunk
        assert not products and not ops._META_AS_CUDA
    else:
        assert torch.float32 in {dtype for dtype, _ in wide} and products


def test_the_head_gradient_falls_back_where_addmm_has_no_fp32_output(monkeypatch):
    """addmm(out_dtype=float32) raises off CUDA (and on torches without it): the chunk's product
    is made and added instead, once the refusal is noted no second try."""
    monkeypatch.setattr(L, "_as_cuda", lambda t: True)
    monkeypatch.setattr(L, "_NO_ADDMM_FP32_OUT", set())
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(64, 300, generator=gen).bfloat16()
    x = torch.randn(64, 16, generator=gen).bfloat16()
    grad_w = torch.randn(300, 16, generator=gen)
    want = grad_w + (grad.t() @ x).float()
    L._add_head_grad(grad_w, grad, x)
    assert torch.equal(grad_w, want) and L._NO_ADDMM_FP32_OUT == {"cpu"}


@pytest.mark.gpu
def test_cuda_head_gradient_accumulates_in_fp32():
    """On CUDA with 16-bit inputs d W gets every chunk's product at fp32 precision: as close to
    the fp64 sum as one fp32 rounding, where the fallback rounds each product to bf16 first."""
    L._NO_ADDMM_FP32_OUT.discard("cuda")
    try:
        torch.addmm(torch.zeros(2, 2, device="cuda"), torch.ones(2, 3, device="cuda", dtype=torch.bfloat16),
                    torch.ones(3, 2, device="cuda", dtype=torch.bfloat16), out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        pytest.skip("this torch has no addmm with an fp32 output for bf16 inputs")
    gen = torch.Generator(device="cuda").manual_seed(0)
    chunks = [(torch.randn(512, 4000, device="cuda", generator=gen).bfloat16(),
               torch.randn(512, 64, device="cuda", generator=gen).bfloat16()) for _ in range(4)]
    grad_w = torch.zeros(4000, 64, device="cuda")
    for grad, x in chunks:
        L._add_head_grad(grad_w, grad, x)
    assert "cuda" not in L._NO_ADDMM_FP32_OUT
    exact = sum(g.double().t() @ x.double() for g, x in chunks)
    rounded = sum((g.t() @ x).double() for g, x in chunks)
    err = lambda a: float((a.double() - exact).norm() / exact.norm())
    assert err(grad_w) < 1e-5 < err(rounded)


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True])
def test_cuda_op_takes_the_kernel(monkeypatch, autocast):
    calls = []
    real = triton_ce.logit_grad_
    monkeypatch.setattr(triton_ce, "logit_grad_", lambda *a, **k: calls.append(1) or real(*a, **k))
    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(1000, 128, device="cuda", generator=gen).requires_grad_()
    w = (torch.randn(7000, 128, device="cuda", generator=gen) * 0.1).requires_grad_()
    y = torch.randint(0, 7000, (1000,), device="cuda", generator=gen)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = linear_cross_entropy(h, w, y, chunk_tokens=384)
        ref = linear_cross_entropy_reference(h, w, y)
    assert len(calls) == 3
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
