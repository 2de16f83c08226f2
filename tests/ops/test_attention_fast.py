"""Fast attention paths: the analytic flex block mask, flex against the reference, the dispatcher.

CPU tests run flex in its unfused eager form; the fused kernels (compiled flex, flash varlen) are
checked by the `gpu` tests at model shapes.
"""

import random

import pytest
import torch
import torch.nn.attention.flex_attention as flex_api
from torch._dynamo.testing import CompileCounter
from torch.nn.attention.flex_attention import BlockMask

import ops.attention.flex as flex
import ops.attention.varlen as varlen
from ops.attention import BACKENDS, attention, attention_reference, pick_backend, visibility_mask
from ops.attention.flex import BLOCK, attention_flex, flex_block_mask, sink_span

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def rand_inputs(B=1, T=20, Hq=6, Hkv=2, D=16, S=0, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype, device=device)
    q, k, v = r(B, T, Hq, D), r(B, T, Hkv, D), r(B, T, Hkv, D)
    sink_k, sink_v = (r(S, Hkv, D), r(S, Hkv, D)) if S else (None, None)
    return q, k, v, sink_k, sink_v


def random_bounds(rng, T):
    """Boundaries with empty documents, 1-token documents and documents crossing blocks."""
    cuts = sorted(rng.randint(0, T) for _ in range(rng.randint(0, 6)))
    if T > 2 and rng.random() < 0.5:
        cuts += [T // 2, T // 2, T // 2 + 1]  # an empty document, then a 1-token one
    return [0] + sorted(cuts) + [T]


def expected_blocks(T, window, cu, S):
    """From visibility_mask: (blocks with any visible pair, blocks whose every pair is visible),
    [Qb, KVb] over the sink-first key layout; pairs past T or on sink padding count as unseen
    but out-of-range pairs do not stop a block from being full."""
    P = sink_span(S)
    seen = torch.zeros(T, P + T, dtype=torch.bool)
    seen[:, :S] = True
    seen[:, P:] = visibility_mask(T, window=window, cu_seqlens=cu)
    qb, kvb = -(-T // BLOCK), -(-(P + T) // BLOCK)
    grid = lambda x: torch.nn.functional.pad(x, (0, kvb * BLOCK - P - T, 0, qb * BLOCK - T))
    in_range = grid(torch.ones(T, P + T, dtype=torch.bool)).view(qb, BLOCK, kvb, BLOCK)
    seen = grid(seen).view(qb, BLOCK, kvb, BLOCK)
    return seen.any(3).any(1), (seen | ~in_range).all(3).all(1)


def dense_of(num, indices, T, P):
    mask = BlockMask.from_kv_blocks(num, indices, BLOCK_SIZE=BLOCK, seq_lengths=(T, P + T))
    return mask.to_dense()[0, 0].bool()


def test_block_mask_equals_blocks_of_visibility_mask():
    rng = random.Random(0)
    for _ in range(60):
        T = rng.choice([1, 2, 127, 128, 129, 300, 513])
        cu = torch.tensor(random_bounds(rng, T)) if rng.random() < 0.85 else None
        window = rng.choice([None, 0, 1, 5, 127, 128, 129, 300])
        S = rng.choice([0, 1, 5, 128, 130])
        case = dict(T=T, window=window, S=S, bounds=None if cu is None else cu.tolist())
        mask = flex_block_mask(cu, T, window=window, num_sinks=S)
        P = sink_span(S)
        partial = dense_of(mask.kv_num_blocks, mask.kv_indices, T, P)
        full = dense_of(mask.full_kv_num_blocks, mask.full_kv_indices, T, P)
        any_seen, all_seen = expected_blocks(T, window, cu, S)
        diagonal = torch.zeros_like(all_seen)
        diagonal[torch.arange(len(diagonal)), torch.arange(len(diagonal)) + P // BLOCK] = True
        assert torch.equal(partial | full, any_seen), case
        assert not (partial & full).any(), case
        # full blocks skip the mask_mod, so they must be fully visible; the diagonal never is
        # full (for the 1-query last block it could be; partial is merely slower there)
        assert torch.equal(full, all_seen & ~diagonal), case
        assert torch.equal(mask.to_dense()[0, 0].bool(), any_seen), case


def test_block_mask_shapes_depend_on_length_and_sinks_only():
    shapes = set()
    for bounds, window in (([0, 300], None), ([0, 1, 1, 299, 300], 5), ([0, 150, 300], 129)):
        mask = flex_block_mask(torch.tensor(bounds, dtype=torch.int32), 300, window=window,
                               num_sinks=130)
        shapes.add(tuple(t.shape for t in mask.as_tuple() if isinstance(t, torch.Tensor)))
    assert len(shapes) == 1


@pytest.fixture
def cpu_flex_autograd(monkeypatch):
    """Flex refuses autograd on CPU, although its unfused eager form is plain differentiable
    torch code; lift the check so gradients can be compared with the reference."""
    monkeypatch.setattr(flex_api, "_validate_device", lambda *args: None)


@pytest.fixture
def block_sparse_eager(monkeypatch):
    """Eager flex applies only the mask_mod; make it honour the block lists like the fused
    kernel: a pair counts iff its block is full, or partial and the mask_mod allows it."""
    build = flex.flex_block_mask

    def emulated(cu_seqlens, T, *, window=None, num_sinks=0, device=None):
        mask = build(cu_seqlens, T, window=window, num_sinks=num_sinks, device=device)
        P = sink_span(num_sinks)
        partial = dense_of(mask.kv_num_blocks, mask.kv_indices, T, P)
        full = dense_of(mask.full_kv_num_blocks, mask.full_kv_indices, T, P)

        def mask_mod(b, h, q_idx, kv_idx):
            qb, kb = q_idx // BLOCK, kv_idx // BLOCK
            return full[qb, kb] | (partial[qb, kb] & mask.mask_mod(b, h, q_idx, kv_idx))

        return BlockMask.from_kv_blocks(mask.kv_num_blocks, mask.kv_indices,
                                        mask.full_kv_num_blocks, mask.full_kv_indices,
                                        BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(T, P + T))

    monkeypatch.setattr(flex, "flex_block_mask", emulated)


@pytest.mark.parametrize("B,T,Hq,Hkv,window,S,bounds", [
    (1, 300, 6, 2, 37, 5, [0, 100, 101, 300]),
    (1, 257, 4, 1, None, 128, [0, 0, 128, 129, 257]),
    (1, 261, 6, 3, 130, 130, [0, 1, 2, 200, 200, 261]),
    (1, 129, 4, 4, 0, 0, None),
    (2, 141, 6, 2, 20, 3, None),
    (1, 1, 2, 1, None, 2, [0, 1]),
])
def test_flex_matches_reference_with_gradients(cpu_flex_autograd, block_sparse_eager, B, T, Hq,
                                               Hkv, window, S, bounds):
    inputs = rand_inputs(B=B, T=T, Hq=Hq, Hkv=Hkv, S=S, seed=T)
    cu = None if bounds is None else torch.tensor(bounds, dtype=torch.int32)
    g = torch.randn(B, T, Hq, 16, generator=torch.Generator().manual_seed(1))
    results = []
    for fn in (attention_reference, attention_flex):
        leaves = [t.clone().requires_grad_() for t in inputs if t is not None]
        sinks = dict(sink_k=leaves[3], sink_v=leaves[4]) if S else {}
        out = fn(*leaves[:3], window=window, cu_seqlens=cu, scale=0.2, **sinks)
        (out * g).sum().backward()
        results.append([out] + [t.grad for t in leaves])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_flex_compiles_once_across_document_layouts(monkeypatch):
    """The compiled kernel's guards hold for new cu_seqlens (even a new number of documents):
    dynamo sees only fixed-shape tensors. CompileCounter runs the captured graph eagerly."""
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(flex_api.flex_attention, backend=counter, dynamic=False)
    monkeypatch.setattr(flex, "_flex_kernel", lambda device: compiled)
    q, k, v, sk, sv = rand_inputs(T=300, S=5)
    for bounds in ([0, 100, 101, 300], [0, 7, 7, 250, 300], [0, 300]):
        cu = torch.tensor(bounds, dtype=torch.int32)
        kwargs = dict(window=37, sink_k=sk, sink_v=sv, cu_seqlens=cu)
        torch.testing.assert_close(attention_flex(q, k, v, **kwargs),
                                   attention_reference(q, k, v, **kwargs), rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_cpu_dispatch_stays_reference():
    q, k, v, sk, sv = rand_inputs(T=40, S=3)
    cu = torch.tensor([0, 17, 40])
    for window, sinks, packed in ((None, 0, False), (5, 0, True), (5, 3, True), (None, 3, False)):
        assert pick_backend(q, window=window, num_sinks=sinks, packed=packed) == "reference"
    kwargs = dict(window=5, sink_k=sk, sink_v=sv, cu_seqlens=cu)
    assert torch.equal(attention(q, k, v, **kwargs),
                       attention(q, k, v, backend="reference", **kwargs))


def test_backend_keyword():
    q, k, v, sk, sv = rand_inputs(T=50, S=2)
    kwargs = dict(window=9, sink_k=sk, sink_v=sv, cu_seqlens=torch.tensor([0, 20, 50]))
    want = attention_reference(q, k, v, **kwargs)
    assert set(BACKENDS) == {"reference", "sdpa", "flex", "varlen", "triton"}
    for backend in ("sdpa", "flex"):  # flex runs eagerly on CPU (no autograd there)
        torch.testing.assert_close(attention(q, k, v, backend=backend, **kwargs), want,
                                   rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="backend='varlen'"):
        attention(q, k, v, backend="varlen", **kwargs)
    with pytest.raises(ValueError, match="backend='triton'"):  # CPU without the interpreter
        attention(q, k, v, backend="triton", **kwargs)
    with pytest.raises(ValueError, match="backend must be"):
        attention(q, k, v, backend="cudnn", **kwargs)


def flash_varlen_contract(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None,
                          window_size=(-1, -1), enable_gqa=False):
    """flash-attention varlen as documented: sequence n spans cu[n] .. cu[n+1] of the packed
    [total, H, D] inputs; query i sees keys i - left .. i + right (-1: unbounded)."""
    assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    assert max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
    assert isinstance(window_size, tuple)  # torch tests window_size == (-1, 0) for causal
    left, right = window_size
    out = torch.zeros_like(q)
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        i, j = torch.arange(b - a)[:, None], torch.arange(b - a)[None]
        seen = ((j <= i + right) | (right < 0)) & ((j >= i - left) | (left < 0))
        G = q.shape[1] // k.shape[1]
        kk, vv = (x[a:b].repeat_interleave(G, dim=1) for x in (k, v))
        scores = torch.einsum("ihd,jhd->hij", q[a:b], kk) * scale
        probs = scores.masked_fill(~seen, float("-inf")).softmax(-1)
        out[a:b] = torch.einsum("hij,jhd->ihd", probs, vv)
    return out


@pytest.mark.parametrize("B,window,bounds", [(1, 4, [0, 9, 9, 10, 30]), (1, None, [0, 13, 30]),
                                             (3, 6, None), (2, None, None)])
def test_varlen_call_follows_flash_contract(monkeypatch, B, window, bounds):
    """What attention_varlen hands the kernel (cu_seqlens, longest document, window_size, scale,
    grouped heads), checked against flash attention's documented semantics on CPU."""
    monkeypatch.setattr(varlen, "varlen_attn", flash_varlen_contract)
    monkeypatch.setattr(varlen, "varlen_unsupported", lambda q, num_sinks: None)
    q, k, v, _, _ = rand_inputs(B=B, T=30)
    cu = None if bounds is None else torch.tensor(bounds, dtype=torch.int32)
    kwargs = dict(window=window, cu_seqlens=cu, scale=0.3)
    torch.testing.assert_close(varlen.attention_varlen(q, k, v, **kwargs),
                               attention_reference(q, k, v, **kwargs), rtol=1e-4, atol=1e-5)


def test_longest_document_is_read_once_per_cu_seqlens():
    cu = torch.tensor([0, 5, 12, 14], dtype=torch.int32)
    assert varlen._longest_document(cu) == 7
    cu[3] = 30  # in place: the version changes, so the cache does not answer
    assert varlen._longest_document(cu) == 18
    assert varlen._longest_document(torch.tensor([0, 2], dtype=torch.int32)) == 2


def test_varlen_refuses_what_it_cannot_run():
    q = torch.zeros(1, 8, 4, 16)
    assert varlen.varlen_unsupported(q, 4) and varlen.varlen_unsupported(q, 0)  # sinks; CPU


# -- CUDA ------------------------------------------------------------------------------------------
def packed_bounds(T, seed=0):
    """Documents from 1 token to several windows long, summing to T."""
    rng, bounds = random.Random(seed), [0]
    while bounds[-1] < T:
        bounds.append(min(T, bounds[-1] + rng.choice([1, 37, 500, 1300, 2900, 5000])))
    return bounds


def relative_error(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def fwd_bwd(backend, inputs, window, cu, grad):
    leaves = [t.detach().clone().requires_grad_() for t in inputs if t is not None]
    sinks = dict(sink_k=leaves[3], sink_v=leaves[4]) if len(leaves) == 5 else {}
    out = attention(*leaves[:3], window=window, cu_seqlens=cu, backend=backend, **sinks)
    out.backward(grad)
    return [out] + [t.grad for t in leaves]


def skip_unless_varlen_runs(backend, q, S):
    reason = varlen.varlen_unsupported(q, S) if backend == "varlen" else None
    if reason:  # sinks, or a torch whose varlen_attn lacks window_size
        pytest.skip(reason)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "flex", "varlen", "sdpa", None])
@pytest.mark.parametrize("T,window,S", [(4096, 1024, 0), (4096, 1024, 128), (4096, None, 0),
                                        (4096, None, 128), (4001, 1024, 0), (4001, 1024, 128),
                                        (512, 3, 0), (512, 3, 128)])
def test_cuda_backend_matches_reference(backend, T, window, S):
    """bf16 at model head shapes (GQA 28/4, D 128) against the fp32 reference of the same inputs.
    Window 3 makes one key a quarter of a row's weight, so an off-by-one window fails."""
    inputs = rand_inputs(T=T, Hq=28, Hkv=4, D=128, S=S, dtype=torch.bfloat16, device="cuda")
    skip_unless_varlen_runs(backend, inputs[0], S)
    cu = torch.tensor(packed_bounds(T), dtype=torch.int32, device="cuda")
    grad = torch.randn(1, T, 28, 128, device="cuda", dtype=torch.bfloat16)
    got = fwd_bwd(backend, inputs, window, cu, grad)
    want = fwd_bwd("reference", [None if t is None else t.float() for t in inputs], window, cu,
                   grad.float())
    for name, a, b in zip(["out", "dq", "dk", "dv", "dsink_k", "dsink_v"], got, want):
        assert relative_error(a, b) < 2e-2, (name, relative_error(a, b))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend,S", [("varlen", 0), ("flex", 0), ("flex", 128), ("triton", 0),
                                       ("triton", 128)])
def test_cuda_131072_tokens_in_linear_memory(backend, S):
    """A 128k packed row with window 4096 runs fwd+bwd in one call per layer: memory above the
    inputs (output, gradients and the kernels' workspace) stays far below a dense [T, T] mask
    (16 GiB as bool), and the last document's rows equal the reference run on it alone."""
    T, window, last = 131072, 4096, 3000
    inputs = rand_inputs(T=T, Hq=28, Hkv=4, D=128, S=S, dtype=torch.bfloat16, device="cuda")
    skip_unless_varlen_runs(backend, inputs[0], S)
    leaves = [t.requires_grad_() for t in inputs if t is not None]
    cu = torch.tensor([0, 70000, 70001, 120000, T - last, T], dtype=torch.int32, device="cuda")
    grad = torch.randn(1, T, 28, 128, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    sinks = dict(sink_k=leaves[3], sink_v=leaves[4]) if S else {}
    out = attention(*leaves[:3], window=window, cu_seqlens=cu, backend=backend, **sinks)
    out.backward(grad)
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    print(f"{backend} S={S}: {extra:.2f} GiB above the inputs")
    assert extra < 8
    tail = [t.detach().float() if t.dim() == 3 else t.detach()[:, -last:].float() for t in leaves]
    want = attention_reference(*tail[:3], window=window, sink_k=tail[3] if S else None,
                               sink_v=tail[4] if S else None)
    assert relative_error(out[:, -last:], want) < 2e-2


@pytest.mark.gpu
@needs_cuda
def test_cuda_flex_does_not_recompile_for_new_documents():
    inputs = rand_inputs(T=4096, Hq=28, Hkv=4, D=128, S=128, dtype=torch.bfloat16, device="cuda")
    grad = torch.randn(1, 4096, 28, 128, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor(packed_bounds(4096, 0), dtype=torch.int32, device="cuda")
    fwd_bwd("flex", inputs, 1024, cu, grad)  # compiles forward and backward
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in (1, 2):  # other values and numbers of documents
            cu = torch.tensor(packed_bounds(4096, seed), dtype=torch.int32, device="cuda")
            fwd_bwd("flex", inputs, 1024, cu, grad)
