"""Causal softmax attention: window, sinks, documents, GQA, gradients and the dispatcher."""

import math

import pytest
import torch

from ops.attention import attention, attention_reference, attention_sdpa


def rand_qkv(B=1, T=12, Hq=4, Hkv=2, D=8, S=0, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=g, dtype=dtype)
    k = torch.randn(B, T, Hkv, D, generator=g, dtype=dtype)
    v = torch.randn(B, T, Hkv, D, generator=g, dtype=dtype)
    if not S:
        return q, k, v, None, None
    sink_k = torch.randn(S, Hkv, D, generator=g, dtype=dtype)
    sink_v = torch.randn(S, Hkv, D, generator=g, dtype=dtype)
    return q, k, v, sink_k, sink_v


def doc_of(T, bounds):
    """Document index of each position, from a Python list of boundaries."""
    doc = [None] * T
    for n, (a, b) in enumerate(zip(bounds, bounds[1:])):
        for t in range(a, b):
            doc[t] = n
    return doc


def loop_attention(q, k, v, *, window=None, sink_k=None, sink_v=None, bounds=None):
    """Row-by-row softmax over [sinks; visible keys], rules written out independently."""
    B, T, Hq, D = q.shape
    G = Hq // k.shape[2]
    doc = doc_of(T, bounds) if bounds is not None else [0] * T
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(Hq):
            kv = h // G
            for i in range(T):
                keys = [j for j in range(T)
                        if j <= i and (window is None or i - j <= window) and doc[j] == doc[i]]
                ks, vs = k[b, keys, kv], v[b, keys, kv]
                if sink_k is not None:
                    ks = torch.cat([sink_k[:, kv], ks])
                    vs = torch.cat([sink_v[:, kv], vs])
                logits = ks @ q[b, i, h] / math.sqrt(D)
                weights = torch.exp(logits - logits.max())
                out[b, i, h] = (weights / weights.sum()) @ vs
    return out


def dense_masked_attention(q, k, v, mask):
    """Full attention with an explicit [T, T] boolean mask; GQA by repeating K/V."""
    G = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("bhij,bjhd->bihd", probs, v)


def window_mask(T, w):
    ones = torch.ones(T, T, dtype=torch.bool)
    return ones.tril() & ~ones.tril(-w - 1)


@pytest.mark.parametrize("T,window", [(63, 16), (20, 0), (20, 1), (33, 7)])
def test_window_equals_explicit_mask(T, window):
    q, k, v, _, _ = rand_qkv(B=2, T=T, Hq=4, Hkv=2)
    expected = dense_masked_attention(q, k, v, window_mask(T, window))
    torch.testing.assert_close(attention_reference(q, k, v, window=window), expected)
    torch.testing.assert_close(attention_sdpa(q, k, v, window=window), expected)


def test_window_is_w_plus_one_keys():
    T, w = 10, 3
    mask = window_mask(T, w)
    assert mask.sum(1).tolist() == [min(i + 1, w + 1) for i in range(T)]
    q, k, v, _, _ = rand_qkv(T=T)
    torch.testing.assert_close(attention_reference(q, k, v, window=w),
                               loop_attention(q, k, v, window=w))


@pytest.mark.parametrize("window", [11, 12, 100])
def test_long_window_equals_full(window):
    q, k, v, _, _ = rand_qkv(T=12)
    full = attention_reference(q, k, v)
    torch.testing.assert_close(attention_reference(q, k, v, window=window), full)
    torch.testing.assert_close(attention_sdpa(q, k, v, window=window), full)
    torch.testing.assert_close(full, dense_masked_attention(q, k, v, window_mask(12, 12)))


@pytest.mark.parametrize("window", [None, 3])
def test_sinks_equal_manual_softmax(window):
    q, k, v, sk, sv = rand_qkv(B=2, T=9, Hq=6, Hkv=2, S=3)
    expected = loop_attention(q, k, v, window=window, sink_k=sk, sink_v=sv)
    got = attention_reference(q, k, v, window=window, sink_k=sk, sink_v=sv)
    torch.testing.assert_close(got, expected)


def test_documents_equal_manual_softmax():
    bounds = [0, 4, 4, 11, 15]
    q, k, v, sk, sv = rand_qkv(T=15, S=2)
    cu = torch.tensor(bounds, dtype=torch.int32)
    expected = loop_attention(q, k, v, window=2, sink_k=sk, sink_v=sv, bounds=bounds)
    got = attention_reference(q, k, v, window=2, sink_k=sk, sink_v=sv, cu_seqlens=cu)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("window,S", [(None, 0), (5, 0), (5, 3), (None, 2)])
def test_documents_equal_running_each_alone(window, S):
    bounds = [0, 7, 7, 20, 31]
    q, k, v, sk, sv = rand_qkv(T=31, Hq=4, Hkv=1, S=S)
    cu = torch.tensor(bounds)
    packed = attention_reference(q, k, v, window=window, sink_k=sk, sink_v=sv, cu_seqlens=cu)
    sdpa = attention_sdpa(q, k, v, window=window, sink_k=sk, sink_v=sv, cu_seqlens=cu)
    torch.testing.assert_close(sdpa, packed)
    for a, b in zip(bounds, bounds[1:]):
        if a == b:
            continue
        alone = attention_reference(q[:, a:b], k[:, a:b], v[:, a:b], window=window,
                                    sink_k=sk, sink_v=sv)
        torch.testing.assert_close(packed[:, a:b], alone)


def test_gqa_equals_repeated_kv():
    q, k, v, sk, sv = rand_qkv(B=2, T=13, Hq=6, Hkv=2, S=2)
    got = attention_reference(q, k, v, window=4, sink_k=sk, sink_v=sv)
    # HF repeat_kv grouping: KV head i serves query heads 3i, 3i+1, 3i+2
    k, v = k.repeat_interleave(3, dim=2), v.repeat_interleave(3, dim=2)
    sk, sv = sk.repeat_interleave(3, dim=1), sv.repeat_interleave(3, dim=1)
    expected = attention_reference(q, k, v, window=4, sink_k=sk, sink_v=sv)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("fn", [attention_reference, attention_sdpa])
@pytest.mark.parametrize("window,S,bounds", [(None, 0, None), (3, 0, None), (3, 2, None),
                                             (4, 2, [0, 5, 6, 14]), (None, 0, [0, 9, 14])])
def test_causality(fn, window, S, bounds):
    T = 14
    q, k, v, sk, sv = rand_qkv(T=T, S=S)
    cu = None if bounds is None else torch.tensor(bounds)
    kwargs = dict(window=window, sink_k=sk, sink_v=sv, cu_seqlens=cu)
    base = fn(q, k, v, **kwargs)
    for p in (0, 5, T - 1):
        for idx in range(3):  # perturb q, k or v at position p
            changed = [x.clone() for x in (q, k, v)]
            changed[idx][:, p] += 1.0
            out = fn(*changed, **kwargs)
            torch.testing.assert_close(out[:, :p], base[:, :p], rtol=0, atol=0)
            if idx == 2:  # every row sees its own value
                assert not torch.allclose(out[:, p], base[:, p])


def test_gradcheck():
    q, k, v, sk, sv = rand_qkv(T=7, Hq=4, Hkv=2, D=3, S=2, seed=1)
    cu = torch.tensor([0, 3, 7])
    inputs = [t.requires_grad_() for t in (q, k, v, sk, sv)]

    def f(q, k, v, sk, sv):
        return attention_reference(q, k, v, window=2, sink_k=sk, sink_v=sv, cu_seqlens=cu)

    assert torch.autograd.gradcheck(f, inputs)


def test_sdpa_path_matches_reference_with_gradients():
    q, k, v, sk, sv = rand_qkv(T=23, Hq=6, Hkv=2, S=3, dtype=torch.float32, seed=2)
    cu = torch.tensor([0, 10, 23])
    results = []
    for fn in (attention_reference, attention_sdpa):
        inputs = [t.clone().requires_grad_() for t in (q, k, v, sk, sv)]
        out = fn(*inputs[:3], window=5, sink_k=inputs[3], sink_v=inputs[4], cu_seqlens=cu)
        out.square().sum().backward()
        results.append([out] + [t.grad for t in inputs])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_dispatcher_equals_reference():
    q, k, v, sk, sv = rand_qkv(B=1, T=17, S=2, dtype=torch.float32)
    cu = torch.tensor([0, 8, 17])
    kwargs = dict(window=4, sink_k=sk, sink_v=sv, cu_seqlens=cu, scale=0.3)
    torch.testing.assert_close(attention(q, k, v, **kwargs), attention_reference(q, k, v, **kwargs))


def test_low_precision_returns_input_dtype():
    q, k, v, sk, sv = rand_qkv(T=9, S=2, dtype=torch.bfloat16)
    out = attention(q, k, v, window=3, sink_k=sk, sink_v=sv)
    assert out.dtype == torch.bfloat16
    expected = attention_reference(q.double(), k.double(), v.double(), window=3,
                                   sink_k=sk.double(), sink_v=sv.double())
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)
    # half precision plain causal GQA: SDPA's native grouped path
    full = attention_sdpa(q, k, v)
    assert full.dtype == torch.bfloat16
    expected = attention_reference(q.double(), k.double(), v.double())
    torch.testing.assert_close(full.double(), expected, rtol=2e-2, atol=2e-2)


def test_bad_inputs_raise():
    q, k, v, sk, sv = rand_qkv(B=2, T=6, Hq=4, Hkv=2, S=2)
    cu = torch.tensor([0, 6])
    bad = [
        dict(q=q[0]),
        dict(k=k[:, :5], v=v[:, :5]),
        dict(v=v[..., :4]),
        dict(q=torch.randn(2, 6, 3, 8, dtype=q.dtype)),
        dict(q=q.float()),
        dict(window=-1),
        dict(window=2.5),
        dict(window=True),
        dict(sink_k=sk),
        dict(sink_k=sk[:, :1], sink_v=sv[:, :1]),
        dict(sink_k=sk.float(), sink_v=sv.float()),
        dict(cu_seqlens=cu),  # B == 2
        dict(q=q[:1], k=k[:1], v=v[:1], cu_seqlens=torch.tensor([0, 5])),
        dict(q=q[:1], k=k[:1], v=v[:1], cu_seqlens=torch.tensor([0, 4, 3, 6])),
        dict(q=q[:1], k=k[:1], v=v[:1], cu_seqlens=torch.tensor([0.0, 6.0])),
        dict(q=q[:1], k=k[:1], v=v[:1], cu_seqlens=torch.tensor([6])),
        dict(scale="x"),
    ]
    for override in bad:
        args = dict(q=q, k=k, v=v, sink_k=None, sink_v=None, window=None, cu_seqlens=None)
        args.update(override)
        with pytest.raises(ValueError):
            attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window,S,bounds",
                         [(None, 0, None), (37, 0, None), (37, 5, [0, 100, 101, 300])])
def test_cuda_dispatcher_matches_reference(window, S, bounds):
    q, k, v, sk, sv = rand_qkv(T=300, Hq=8, Hkv=2, D=64, S=S, dtype=torch.float32)
    results = []
    for device in ("cpu", "cuda"):
        tensors = [t for t in (q, k, v, sk, sv) if t is not None]
        leaves = [t.detach().to(device).requires_grad_() for t in tensors]
        cu = None if bounds is None else torch.tensor(bounds, device=device)
        sinks = dict(sink_k=leaves[3], sink_v=leaves[4]) if S else {}
        out = attention(*leaves[:3], window=window, cu_seqlens=cu, **sinks)
        out.square().sum().backward()
        results.append([out] + [t.grad for t in leaves])
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-3, atol=1e-3)


def test_long_packed_input_is_split_into_document_bins_exactly():
    """Above BIN_TOKENS the dispatcher runs groups of whole documents separately; the result
    equals the dense reference over the whole packed row, including sinks and a long document."""
    from ops.attention import BIN_TOKENS, attention, document_bins
    from ops.attention.reference import attention_reference

    torch.manual_seed(0)
    lengths = [300, 1, 250, BIN_TOKENS + 40, 7, 120]
    T = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    assert len(document_bins(cu)) > 2
    q = torch.randn(1, T, 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, T, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, T, 2, 8, dtype=torch.float64, requires_grad=True)
    sk, sv = torch.randn(3, 2, 8, dtype=torch.float64), torch.randn(3, 2, 8, dtype=torch.float64)
    got = attention(q, k, v, window=37, sink_k=sk, sink_v=sv, cu_seqlens=cu)
    want = attention_reference(q, k, v, window=37, sink_k=sk, sink_v=sv, cu_seqlens=cu)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    g1 = torch.autograd.grad(got.sum(), (q, k, v))
    g2 = torch.autograd.grad(want.sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
