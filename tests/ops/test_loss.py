"""Chunked linear + cross-entropy against the plain path (full logits, fp32 cross-entropy): loss
and both gradients in fp32 and under bf16 autocast, ignored targets, tied weights, inputs without
gradients, chunks that do not divide the tokens, and the largest tensor it ever makes."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ops.loss import default_chunk_tokens, linear_cross_entropy, linear_cross_entropy_reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
GRAD_OUT = 0.37  # the trainer scales loss_sum by 1 / (global target count)


def problem(n=203, d=48, v=611, device="cpu", seed=0, ignored_every=5):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen)
    w = torch.randn(v, d, generator=gen) * 0.3
    y = torch.randint(0, v, (n,), generator=gen)
    if ignored_every:
        y[::ignored_every] = -100
    return h.to(device), w.to(device), y.to(device)


def loss_and_grads(fn, h, w, y, autocast=None, **kw):
    """(loss_sum, d h, d w) of GRAD_OUT * fn(h, w, y), with fresh leaves."""
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast(h.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        loss = fn(h, w, y, **kw)
    (GRAD_OUT * loss).backward()
    return loss.detach(), h.grad, w.grad


@pytest.fixture
def nan_buffers(monkeypatch):
    """Output buffers start as NaN, so a row the op never writes fails the comparison."""
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: empty_like(t, **kw).fill_(float("nan")))


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [None, 1, 7, 64, 203, 1000])
def test_fp32_matches_the_plain_path(device, chunk, nan_buffers):
    h, w, y = problem(device=device)
    ref = loss_and_grads(linear_cross_entropy_reference, h, w, y)
    out = loss_and_grads(linear_cross_entropy, h, w, y, chunk_tokens=chunk)
    assert out[0].dtype == torch.float32 and out[0].dim() == 0
    torch.testing.assert_close(out[0], ref[0], rtol=1e-6, atol=0)
    for got, want in zip(out[1:], ref[1:]):
        assert got.dtype == want.dtype == torch.float32
        assert rel_err(got, want) < 2e-6


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_is_as_close_to_fp64_as_the_plain_path(device):
    """Under autocast both paths round the logits and their gradient to bf16: same loss, and
    gradients no further from the float64 truth than the plain path's."""
    h, w, y = problem(n=500, d=64, v=1000, device=device)
    exact = loss_and_grads(linear_cross_entropy_reference, h.double(), w.double(), y)
    ref = loss_and_grads(linear_cross_entropy_reference, h, w, y, autocast=torch.bfloat16)
    out = loss_and_grads(linear_cross_entropy, h, w, y, autocast=torch.bfloat16, chunk_tokens=96)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=0)
    for got, plain, truth in zip(out[1:], ref[1:], exact[1:]):
        assert got.dtype == torch.float32  # the leaves' dtype, as autograd gives the plain path
        assert 1e-4 < rel_err(plain, truth) < 1e-2  # bf16 rounding is really there
        assert rel_err(got, truth) < 1.5 * rel_err(plain, truth)


def test_bf16_inputs_without_autocast():
    h, w, y = problem()
    h, w = h.bfloat16(), w.bfloat16()
    exact = loss_and_grads(linear_cross_entropy_reference, h.double(), w.double(), y)
    ref = loss_and_grads(linear_cross_entropy_reference, h, w, y)
    out = loss_and_grads(linear_cross_entropy, h, w, y, chunk_tokens=50)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=0)
    for got, plain, truth in zip(out[1:], ref[1:], exact[1:]):
        assert got.dtype == torch.bfloat16
        assert rel_err(got, truth) < 1.5 * rel_err(plain, truth)


def test_all_targets_ignored_give_zero_loss_and_zero_gradients(nan_buffers):
    h, w, _ = problem()
    y = torch.full((h.shape[0],), -100)
    loss, gh, gw = loss_and_grads(linear_cross_entropy, h, w, y, chunk_tokens=64)
    assert loss.item() == 0.0
    assert gh is not None and gw is not None and not gh.any() and not gw.any()


def test_other_ignore_index():
    h, w, y = problem(ignored_every=0)
    y[::3] = 7  # a real class id used as the ignore value
    ref = loss_and_grads(lambda *a: F.cross_entropy(F.linear(a[0], a[1]), a[2], ignore_index=7,
                                                    reduction="sum"), h, w, y)
    out = loss_and_grads(linear_cross_entropy, h, w, y, ignore_index=7, chunk_tokens=31)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-6, atol=0)
    for got, want in zip(out[1:], ref[1:]):
        assert rel_err(got, want) < 2e-6


def test_weight_tied_to_the_embedding_gets_both_gradients():
    """The same Parameter looks tokens up and scores them: its gradient is the sum of both uses."""
    v, d, n = 300, 32, 150
    torch.manual_seed(0)
    ids = torch.randint(0, v, (n,))
    y = torch.roll(ids, -1)
    y[-1] = -100
    proj = torch.randn(d, d) / d ** 0.5

    def grads(fn):
        emb = torch.nn.Embedding(v, d)
        with torch.no_grad():
            emb.weight.copy_(torch.randn(v, d, generator=torch.Generator().manual_seed(1)))
        h = torch.tanh(emb(ids) @ proj)
        fn(h, emb.weight, y).backward()
        return emb.weight.grad

    ref, out = grads(linear_cross_entropy_reference), grads(
        lambda h, w, y: linear_cross_entropy(h, w, y, chunk_tokens=40))
    assert rel_err(out, ref) < 2e-6
    lookup_rows = torch.zeros(v, dtype=torch.bool)
    lookup_rows[ids] = True
    assert out[lookup_rows].abs().sum() > 0 and out[~lookup_rows].abs().sum() > 0


def test_inputs_without_gradient():
    h, w, y = problem()
    ref_h = h.clone().requires_grad_()
    (GRAD_OUT * linear_cross_entropy_reference(ref_h, w, y)).backward()
    frozen = h.clone().requires_grad_()
    (GRAD_OUT * linear_cross_entropy(frozen, w, y, chunk_tokens=50)).backward()  # frozen head
    assert rel_err(frozen.grad, ref_h.grad) < 2e-6
    head = w.clone().requires_grad_()
    (GRAD_OUT * linear_cross_entropy(h, head, y, chunk_tokens=50)).backward()  # no grad to h
    assert head.grad is not None
    with torch.no_grad():
        loss = linear_cross_entropy(h.requires_grad_(), head, y)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, linear_cross_entropy_reference(h, w, y).detach(), rtol=1e-6, atol=0)


def test_a_retained_graph_cannot_reuse_the_scaled_gradient():
    h, w, y = problem()
    h.requires_grad_()
    loss = linear_cross_entropy(h, w, y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


@pytest.mark.parametrize("bad, message", [
    (dict(h=torch.zeros(4, 3)), "weight"),
    (dict(y=torch.zeros(5, dtype=torch.long)), "targets"),
    (dict(y=torch.zeros(4, dtype=torch.int32)), "int64"),
    (dict(chunk_tokens=0), "chunk_tokens"),
])
def test_bad_inputs_are_named(bad, message):
    args = dict(h=torch.zeros(4, 8), w=torch.zeros(10, 8), y=torch.zeros(4, dtype=torch.long))
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(args["h"], args["w"], args["y"], chunk_tokens=args.get("chunk_tokens"))


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("fn, bounded", [(linear_cross_entropy, True),
                                         (linear_cross_entropy_reference, False)])
def test_no_tensor_holds_the_logits_of_every_token(fn, bounded):
    """Forward and backward make nothing larger than one chunk of logits (or d W): never [N, V].
    The plain path shows the check can fail."""
    n, d, v, chunk = 1024, 16, 2048, 128
    h, w, y = problem(n=n, d=d, v=v)
    h.requires_grad_()
    w.requires_grad_()
    with LargestTensor() as mode:
        loss = fn(h, w, y, chunk_tokens=chunk) if bounded else fn(h, w, y)
        loss.backward()
    if bounded:
        assert mode.largest == chunk * v
    else:
        assert mode.largest == n * v


def test_default_chunk_keeps_fp32_logits_near_a_gibibyte():
    chunk = default_chunk_tokens(152064)
    assert chunk % 128 == 0 and 0.8 < chunk * 152064 * 4 / 2 ** 30 <= 1.0
    assert default_chunk_tokens(10 ** 9) == 128
