"""GLA ops: chunked form vs the step-by-step recurrence (outputs, final states, every gradient)."""
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from ops.gla import chunk_gla, recurrent_gla

K, V = 16, 16
TOL32 = dict(rtol=1e-5, atol=1e-5)
TOL64 = dict(rtol=1e-10, atol=1e-10)


def make_inputs(B, T, Hq, Hkv, *, N=None, with_state=False, dtype=torch.float32, g=None, seed=0):
    """Leaf tensors q [B,T,Hq,K], k/g [B,T,Hkv,K], v [B,T,Hkv,V], h0 [N,Hkv,K,V] or None."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    q, k, v = rand(B, T, Hq, K), rand(B, T, Hkv, K), rand(B, T, Hkv, V)
    if g is None:  # the model's gate: logsigmoid(x) / 16, with a spread of rates
        g = F.logsigmoid(rand(B, T, Hkv, K) * 3) / 4
    h0 = rand(N or B, Hkv, K, V) if with_state else None
    leaves = [x.to(dtype).requires_grad_() for x in (q, k, v, g)]
    if h0 is not None:
        leaves.append(h0.float().requires_grad_())  # states are float32 whatever the input dtype
    return leaves


def run(fn, leaves, **kw):
    """o, final state and grads of a fixed random loss w.r.t. every leaf (zeros where unused)."""
    q, k, v, g = leaves[:4]
    h0 = leaves[4] if len(leaves) > 4 else None
    o, ht = fn(q, k, v, g, initial_state=h0, output_final_state=True, **kw)
    gen = torch.Generator().manual_seed(123)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
    dht = torch.randn(ht.shape, generator=gen, dtype=torch.float64).to(ht.dtype)
    loss = (o * do).sum() + (ht * dht).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    return o.detach(), ht.detach(), [x.detach() for x in grads]


def assert_runs_close(a, b, **tol):
    for name, x, y in zip(["o", "final_state"], a[:2], b[:2]):
        assert torch.isfinite(x).all(), name
        assert_close(x, y, **tol, msg=lambda m: f"{name}: {m}")
    for name, x, y in zip(["dq", "dk", "dv", "dg", "dh0"], a[2], b[2]):
        assert torch.isfinite(x).all(), name
        assert_close(x, y, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("T,chunk_size,Hq,Hkv,with_state", [
    (1, 16, 2, 2, False),
    (63, 16, 2, 2, False),
    (63, 16, 4, 2, True),
    (64, 64, 4, 1, True),
    (500, 64, 2, 2, True),
    (500, 64, 4, 2, False),
])
def test_chunk_matches_recurrent_fp32(T, chunk_size, Hq, Hkv, with_state):
    leaves = make_inputs(2, T, Hq, Hkv, with_state=with_state)
    ref = run(recurrent_gla, leaves)
    got = run(chunk_gla, leaves, chunk_size=chunk_size)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert_runs_close(got, ref, **TOL32)


def test_chunk_matches_recurrent_fp64_tight():
    leaves = make_inputs(1, 77, 4, 2, with_state=True, dtype=torch.float64)
    assert_runs_close(run(chunk_gla, leaves, chunk_size=16), run(recurrent_gla, leaves), **TOL64)


def test_recurrent_matches_naive_quadratic_formula():
    """o_t = scale * sum_{s<=t} (q_t * exp(sum_{s<i<=t} g_i) . k_s) v_s, in float64, no state."""
    q, k, v, g = make_inputs(1, 20, 4, 2, dtype=torch.float64)
    o, _ = recurrent_gla(q, k, v, g, scale=0.3)
    b = g.cumsum(1)  # fine in float64 at this length
    kk, vv, bb = (x.repeat_interleave(2, dim=2) for x in (k, v, b))
    decay = (bb[:, :, None] - bb[:, None, :]).exp()                 # [B, T(t), T(s), H, K]
    scores = torch.einsum("bthk,btshk,bshk->bhts", q, decay, kk).tril()
    expected = 0.3 * torch.einsum("bhts,bshv->bthv", scores, vv)
    assert_close(o, expected, **TOL64)


@pytest.mark.parametrize("fn", [recurrent_gla, chunk_gla])
def test_gqa_equals_explicitly_repeated_kv(fn):
    Hq, Hkv = 6, 2
    leaves = make_inputs(2, 45, Hq, Hkv, with_state=True)
    q, k, v, g, h0 = leaves
    kw = dict(chunk_size=16) if fn is chunk_gla else {}
    got = run(fn, leaves, **kw)

    def repeated(q, k, v, g, *, initial_state, **kw):
        k, v, g = (x.repeat_interleave(Hq // Hkv, dim=2) for x in (k, v, g))
        o, ht = fn(q, k, v, g, initial_state=initial_state.repeat_interleave(Hq // Hkv, dim=1), **kw)
        return o, ht.view(ht.shape[0], Hkv, Hq // Hkv, K, V)[:, :, 0]  # every copy has one state

    ref = run(repeated, leaves, **kw)
    assert_runs_close(got, ref, **TOL32)


@pytest.mark.parametrize("with_state", [False, True])
def test_varlen_equals_each_document_alone(with_state):
    # lengths 1, 39 (longer than a chunk), 0, 5, 75 (several chunks, ragged tail)
    bounds = [0, 1, 40, 40, 45, 120]
    cu = torch.tensor(bounds, dtype=torch.int32)
    N = len(bounds) - 1
    leaves = make_inputs(1, bounds[-1], 4, 2, N=N, with_state=with_state)

    def per_document(fn, **kw):
        def one_by_one(q, k, v, g, *, initial_state, output_final_state):
            outs, finals = [], []
            for n, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
                h0 = None if initial_state is None else initial_state[n:n + 1]
                o, ht = fn(q[:, bos:eos], k[:, bos:eos], v[:, bos:eos], g[:, bos:eos],
                           initial_state=h0, output_final_state=output_final_state, **kw)
                outs.append(o)
                finals.append(ht)
            return torch.cat(outs, dim=1), torch.cat(finals)
        return one_by_one

    ref = run(per_document(recurrent_gla), leaves)
    assert_runs_close(run(per_document(chunk_gla, chunk_size=16), leaves), ref, **TOL32)
    assert_runs_close(run(chunk_gla, leaves, cu_seqlens=cu, chunk_size=16), ref, **TOL32)
    assert_runs_close(run(recurrent_gla, leaves, cu_seqlens=cu), ref, **TOL32)
    if with_state:  # the empty document hands its initial state straight back
        _, ht, _ = run(chunk_gla, leaves, cu_seqlens=cu, chunk_size=16)
        assert_close(ht[2], leaves[4][2].detach(), rtol=0, atol=0)


@pytest.mark.parametrize("pattern", ["uniform", "long_then_tiny", "hard_zero", "minus_inf"])
def test_strong_decay_is_finite_and_exact(pattern):
    B, T, Hkv = 1, 130, 2
    gen = torch.Generator().manual_seed(1)
    if pattern == "uniform":
        g = -50 * torch.rand(B, T, Hkv, K, generator=gen, dtype=torch.float64)
    elif pattern == "long_then_tiny":
        # The cumulative decay reaches ~-3000 inside a chunk, then steps of -1e-3 must stay exact.
        g = torch.full((B, T, Hkv, K), -50.0, dtype=torch.float64)
        g[:, 60:] = -1e-3 * torch.rand(B, T - 60, Hkv, K, generator=gen, dtype=torch.float64)
    elif pattern == "hard_zero":  # half the channels forget every step, the other half never decay
        g = torch.zeros(B, T, Hkv, K, dtype=torch.float64)
        g[..., : K // 2] = -50.0
    else:  # a full reset (exp(g) = 0) every third step must not produce inf - inf or 0 * inf
        g = torch.zeros(B, T, Hkv, K, dtype=torch.float64)
        g[:, ::3] = float("-inf")
    leaves = make_inputs(B, T, 4, Hkv, with_state=True, g=g)
    ref = run(recurrent_gla, leaves)
    assert_runs_close(run(chunk_gla, leaves, chunk_size=64), ref, rtol=1e-5, atol=1e-4)


def test_no_decay_is_causal_linear_attention():
    B, T, Hq, Hkv = 2, 70, 4, 4
    leaves = make_inputs(B, T, Hq, Hkv, g=torch.zeros(B, T, Hkv, K, dtype=torch.float64),
                         dtype=torch.float64)
    q, k, v, g = leaves
    scores = torch.einsum("bthk,bshk->bhts", q, k).tril() * K ** -0.5
    expected = torch.einsum("bhts,bshv->bthv", scores, v)
    for fn, kw in ((recurrent_gla, {}), (chunk_gla, dict(chunk_size=16))):
        o, ht = fn(q, k, v, g, output_final_state=True, **kw)
        assert_close(o, expected, **TOL64)
        assert_close(ht, torch.einsum("bthk,bthv->bhkv", k, v), **TOL64)
    assert_runs_close(run(chunk_gla, leaves, chunk_size=16), run(recurrent_gla, leaves), **TOL64)


def test_explicit_scale():
    q, k, v, g = make_inputs(1, 33, 2, 2)
    o, _ = chunk_gla(q, k, v, g, scale=0.7, chunk_size=16)
    o_ref, _ = chunk_gla(q * (0.7 / K ** -0.5), k, v, g, chunk_size=16)
    assert_close(o, o_ref, **TOL32)


def test_bf16_inputs_give_bf16_output_close_to_fp32():
    leaves = make_inputs(2, 100, 4, 2, with_state=True, dtype=torch.bfloat16)
    got = run(chunk_gla, leaves, chunk_size=32)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert [x.dtype for x in got[2]] == [torch.bfloat16] * 4 + [torch.float32]
    fp32 = [x.detach().float().requires_grad_() for x in leaves]
    ref = run(chunk_gla, fp32, chunk_size=32)
    assert_close(got[0].float(), ref[0], rtol=2e-2, atol=2e-2)    # bf16 rounding of o only
    assert_close(got[1], ref[1], **TOL32)                          # state never left fp32
    for x, y in zip(got[2], ref[2]):
        assert_close(x.float(), y, rtol=2e-2, atol=5e-2)
    o_rec, _ = recurrent_gla(*leaves[:4])
    assert o_rec.dtype == torch.bfloat16


def test_final_state_only_on_request():
    q, k, v, g = make_inputs(1, 10, 2, 2)
    for fn in (chunk_gla, recurrent_gla):
        assert fn(q, k, v, g)[1] is None


def _bad(**overrides):
    q, k, v, g = (x.detach() for x in make_inputs(2, 8, 4, 2))
    args = dict(q=q, k=k, v=v, g=g)
    kwargs = {}
    for name, value in overrides.items():
        (args if name in args else kwargs)[name] = value
    return args, kwargs


@pytest.mark.parametrize("overrides,message", [
    (dict(q=torch.zeros(2, 8, 4)), r"q must be 4-D"),
    (dict(k=torch.zeros(2, 9, 2, K)), r"k has shape"),
    (dict(k=torch.zeros(2, 8, 2, K + 1)), r"k has shape"),
    (dict(g=torch.zeros(2, 8, 2, K - 1)), r"g has shape"),
    (dict(v=torch.zeros(2, 8, 3, V)), r"v has shape"),
    (dict(q=torch.zeros(2, 8, 3, K)), r"Hq=3 must be a multiple of KV heads Hkv=2"),
    (dict(initial_state=torch.zeros(2, 2, K, V + 1)), r"initial_state has shape"),
    (dict(cu_seqlens=torch.tensor([0, 8])), r"requires batch size B == 1"),
    (dict(chunk_size=0), r"chunk_size must be a positive int"),
])
def test_bad_inputs_raise(overrides, message):
    args, kwargs = _bad(**overrides)
    fns = [chunk_gla] if "chunk_size" in kwargs else [chunk_gla, recurrent_gla]
    for fn in fns:
        with pytest.raises(ValueError, match=message):
            fn(**args, **kwargs)


@pytest.mark.parametrize("cu,message", [
    (torch.tensor([0, 3, 7]), r"end at T=8"),
    (torch.tensor([1, 3, 8]), r"start at 0"),
    (torch.tensor([0, 5, 3, 8]), r"non-decreasing"),
    (torch.tensor([0.0, 8.0]), r"integer tensor"),
    (torch.tensor([[0, 8]]), r"1-D integer tensor"),
])
def test_bad_cu_seqlens_raise(cu, message):
    q, k, v, g = (x.detach()[:1] for x in make_inputs(2, 8, 4, 2))
    for fn in (chunk_gla, recurrent_gla):
        with pytest.raises(ValueError, match=message):
            fn(q, k, v, g, cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"initial_state has shape .* expected \[N=2"):
        chunk_gla(q, k, v, g, cu_seqlens=torch.tensor([0, 4, 8]), initial_state=torch.zeros(1, 2, K, V))
