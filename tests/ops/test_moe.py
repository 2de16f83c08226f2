"""Local MoE dispatch: permute / grouped SwiGLU / unpermute against a per-token loop."""

import pytest
import torch
import torch.nn.functional as F

from ops.moe import grouped_swiglu, grouped_swiglu_reference, permute, unpermute

E, D, FF = 6, 5, 7


def make_case(N, k, used_experts, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=dtype)
    w_gate = torch.randn(E, FF, D, generator=g, dtype=dtype)
    w_up = torch.randn(E, FF, D, generator=g, dtype=dtype)
    w_down = torch.randn(E, D, FF, generator=g, dtype=dtype)
    # k distinct experts per token, drawn from a subset so some experts get no tokens
    used = torch.tensor(used_experts)
    picks = torch.stack([torch.randperm(len(used), generator=g)[:k] for _ in range(N)])
    topk_idx = used[picks]
    topk_weight = torch.rand(N, k, generator=g, dtype=dtype)
    return x, topk_idx, topk_weight, (w_gate, w_up, w_down)


def moe(x, topk_idx, topk_weight, weights):
    x_perm, counts, order = permute(x, topk_idx, E)
    return unpermute(grouped_swiglu(x_perm, counts, *weights), order, topk_weight)


def per_token_loop(x, topk_idx, topk_weight, weights):
    w_gate, w_up, w_down = weights
    rows = []
    for n in range(x.shape[0]):
        y = torch.zeros_like(x[n])
        for j in range(topk_idx.shape[1]):
            e = int(topk_idx[n, j])
            hidden = F.silu(w_gate[e] @ x[n]) * (w_up[e] @ x[n])
            y = y + topk_weight[n, j] * (w_down[e] @ hidden)
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("k,used", [(1, [0, 2, 3]), (2, [1, 2, 4, 5]), (2, [3, 5])])
def test_matches_per_token_loop_with_gradients(k, used):
    x, idx, w, weights = make_case(N=11, k=k, used_experts=used)
    results = []
    for fn in (moe, per_token_loop):
        leaves = [t.clone().requires_grad_() for t in (x, w, *weights)]
        out = fn(leaves[0], idx, leaves[1], leaves[2:])
        out.sin().sum().backward()
        results.append([out] + [t.grad for t in leaves])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected)
    unused = [e for e in range(E) if e not in used]
    for grad in results[0][3:]:  # expert weights: zero gradient where no token went
        assert torch.all(grad[unused] == 0)


def test_permute_layout():
    topk_idx = torch.tensor([[2, 0], [0, 2], [3, 0]])
    x = torch.arange(3.0)[:, None].expand(3, 2)
    x_perm, counts, order = permute(x, topk_idx, 5)
    assert counts.tolist() == [3, 0, 2, 1, 0]
    assert counts.dtype == order.dtype == torch.int64
    assert order.tolist() == [1, 2, 5, 0, 3, 4]  # flat token * k + slot, stable per expert
    assert x_perm[:, 0].tolist() == [0.0, 1.0, 2.0, 0.0, 1.0, 2.0]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_identity_expert_roundtrip_gives_k_times_x(k):
    x, idx, _, _ = make_case(N=9, k=k, used_experts=[0, 1, 4, 5])
    x_perm, counts, order = permute(x, idx, E)
    y = unpermute(x_perm, order, torch.ones(9, k, dtype=x.dtype))
    torch.testing.assert_close(y, k * x)


def test_low_precision_output_dtype():
    x, idx, w, weights = make_case(N=8, k=2, used_experts=[0, 1, 2], dtype=torch.bfloat16)
    y = moe(x, idx, w.float(), weights)
    assert y.dtype == torch.bfloat16
    expected = per_token_loop(x.double(), idx, w.double(), [t.double() for t in weights])
    torch.testing.assert_close(y.double(), expected, rtol=5e-2, atol=5e-2)


def test_no_tokens_keeps_weights_in_graph():
    _, _, _, weights = make_case(N=1, k=1, used_experts=[0])
    weights = [t.requires_grad_() for t in weights]
    x = torch.zeros(0, D, dtype=torch.float64, requires_grad=True)
    x_perm, counts, order = permute(x, torch.zeros(0, 1, dtype=torch.int64), E)
    y = unpermute(grouped_swiglu(x_perm, counts, *weights), order, torch.zeros(0, 1, dtype=x.dtype))
    assert y.shape == (0, D)
    y.sum().backward()
    assert all(t.grad is not None and torch.all(t.grad == 0) for t in weights)


def test_bad_inputs_raise():
    x, idx, w, weights = make_case(N=4, k=2, used_experts=[0, 1, 2])
    w_gate, w_up, w_down = weights
    x_perm, counts, order = permute(x, idx, E)
    with pytest.raises(ValueError):
        permute(x, idx[:3], E)
    with pytest.raises(ValueError):
        permute(x, idx.double(), E)
    with pytest.raises(ValueError):
        permute(x, idx, 2)  # index 2 out of range
    with pytest.raises(ValueError):
        unpermute(x_perm, order, w[:3])
    with pytest.raises(ValueError):
        grouped_swiglu_reference(x_perm, counts[:-1], *weights)
    with pytest.raises(ValueError):
        grouped_swiglu_reference(x_perm, counts + 1, *weights)
    with pytest.raises(ValueError):
        grouped_swiglu_reference(x_perm, counts, w_gate, w_up, w_down.transpose(1, 2))
    with pytest.raises(ValueError):
        grouped_swiglu_reference(x_perm.float(), counts, *weights)


# -- grouped GEMMs ---------------------------------------------------------------------------------
def grouped_case(device, counts, D=64, Fh=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.5).to(device)
    E = len(counts)
    return r(sum(counts), D), torch.tensor(counts, device=device), [r(E, Fh, D), r(E, Fh, D), r(E, D, Fh)]


def check_grouped_matches_loop(device, counts, hidden_fn=None):
    """bf16 grouped GEMMs (fp32 master weights under autocast, as training runs them) against the
    per-expert loop under the same autocast: outputs and every gradient."""
    from ops.moe import grouped_swiglu_grouped_mm
    x, c, weights = grouped_case(device, counts)
    results = []
    for fn in (grouped_swiglu_grouped_mm, grouped_swiglu_reference):
        leaves = [t.clone().requires_grad_() for t in (x, *weights)]
        with torch.autocast(device, dtype=torch.bfloat16):
            y = fn(leaves[0], c, *leaves[1:], hidden_fn=hidden_fn)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        results.append([y.float()] + [t.grad for t in leaves])
    with torch.autocast(device, dtype=torch.bfloat16):  # an expanded (stride 0) output gradient
        grouped_swiglu_grouped_mm(x.requires_grad_(), c, *weights).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, a, b in zip(["y", "dx", "dgate", "dup", "ddown"], *results):
        err = ((a - b).norm() / b.norm()).item()
        assert err < 2e-2, (name, err, counts)
    for grad in results[0][2:]:  # no rows, no gradient
        assert all(torch.all(grad[e] == 0) for e, n in enumerate(counts) if n == 0)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no _grouped_mm")
def test_grouped_mm_path_matches_loop_on_cpu():
    """torch's CPU form of _grouped_mm runs the same code as the CUDA path picks (the dispatcher
    keeps the loop on CPU): ragged segments, an expert with no rows, a row-wise hidden_fn."""
    check_grouped_matches_loop("cpu", [5, 0, 17, 1, 9])
    check_grouped_matches_loop("cpu", [3, 8, 0, 0], hidden_fn=lambda h: h * 0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dispatch_uses_grouped_mm_and_matches_loop():
    from ops.moe import grouped_swiglu_grouped_mm, pick_grouped_swiglu
    x, _, weights = grouped_case("cuda", [1, 2])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        picked = pick_grouped_swiglu(x, weights[0])
    if torch.cuda.get_device_capability() >= (9, 0):
        assert picked is grouped_swiglu_grouped_mm
    check_grouped_matches_loop("cuda", [5, 0, 17, 1, 9, 300, 0, 64])
    check_grouped_matches_loop("cuda", [3, 8, 0, 0], hidden_fn=lambda h: h * 0.5)
