"""W8ASpike weight quantisation: int8 per-group scales, clip search, quantised modules."""
import copy

import pytest
import torch
import torch.nn.functional as F

from model import build_model
from model.moe import Experts
from model.quant import (QMAX, QuantExperts, QuantLinear, dequantize_groupwise, input_importance,
                         quantizable, quantize_groupwise, quantize_model, search_clip)
from model.spiking import attach_spiking
from tests.helpers import model_config


def weights(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * torch.rand(*shape[:-1], 1, generator=g) * 3
    w[..., 0] = 0.0          # exact zeros stay exact
    return w


@pytest.mark.parametrize("shape,group", [((48, 200), 64), ((5, 7, 300), 128), ((16, 128), 128),
                                         ((8, 16), 128), ((3, 130), 1)])
def test_dequantised_weights_within_half_a_step(shape, group):
    w = weights(*shape)
    q, s = quantize_groupwise(w, group)
    groups = -(-shape[-1] // group)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (*shape[:-1], groups)
    assert int(q.abs().max()) <= QMAX
    step = s.repeat_interleave(group, dim=-1)[..., :shape[-1]]
    err = (dequantize_groupwise(q, s, group) - w).abs()
    assert bool((err <= step / 2 * (1 + 1e-6)).all())
    # the largest weight of every group maps to +-127 exactly: no range is wasted
    pad = groups * group - shape[-1]
    q_max = F.pad(q.abs().float(), (0, pad)).unflatten(-1, (groups, group)).amax(-1)
    w_max = F.pad(w.abs(), (0, pad)).unflatten(-1, (groups, group)).amax(-1)
    assert bool((q_max[w_max > 0] == QMAX).all())
    assert bool((dequantize_groupwise(q, s, group)[..., 0] == 0).all())


def test_zero_group_and_clip():
    w = torch.zeros(2, 256)
    w[1, 128:] = torch.linspace(-2, 2, 128)
    q, s = quantize_groupwise(w, 128)
    assert bool((q[0] == 0).all()) and torch.equal(s[0], torch.ones(2))   # zeros: scale 1, no NaN
    clip = torch.tensor([[1.0, 1.0], [1.0, 0.5]])
    q, s = quantize_groupwise(w, 128, clip)
    deq = dequantize_groupwise(q, s, 128)
    inside = w.abs() <= QMAX * s.repeat_interleave(128, -1) * (1 + 1e-6)
    assert bool(((deq - w).abs()[inside] <= s.repeat_interleave(128, -1)[inside] / 2 + 1e-7).all())
    assert torch.allclose(deq[1, 128:].abs().max(), torch.tensor(1.0))   # clipped at 0.5 * max
    assert not bool(inside.all())


def test_search_clip_never_worse_than_max_scaling():
    w = weights(32, 256, seed=3)
    w[:, 5] *= 20  # outliers make clipping worth it for the other weights
    imp = torch.rand(256)
    imp[5] = 1e-6   # ... as long as the outlier's input is small
    imp[128:] = 0   # features that never fire: nothing to gain, keep the full range
    clip = search_clip(w, imp, 128)
    assert clip.shape == (32, 2)
    assert bool((clip[:, 1] == 1.0).all())

    def err(c):
        q, s = quantize_groupwise(w, 128, c)
        return float(((dequantize_groupwise(q, s, 128) - w) ** 2 * imp).sum())
    assert err(clip) <= err(1.0)
    assert bool((clip[:, 0] < 1).any())


def test_quant_linear_matches_dequantised_float_linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(200, 24)
    ql = QuantLinear.from_linear(lin, 64)
    x = torch.randn(3, 5, 200)
    w = dequantize_groupwise(ql.weight, ql.weight_scale, 64)
    torch.testing.assert_close(ql(x), F.linear(x, w, lin.bias), rtol=0, atol=1e-6)
    torch.testing.assert_close(ql(x), lin(x), rtol=0, atol=0.05)
    assert set(ql.state_dict()) == {"weight", "weight_scale", "bias"}


@pytest.mark.parametrize("name", ["sb7b-tiny", "sb76b-tiny"])
def test_quantize_model_swaps_projections_and_keeps_the_rest(name):
    torch.manual_seed(0)
    model = build_model(model_config(name)).eval()
    ids = torch.randint(0, 2048, (2, 40))
    ref = model(ids).logits
    names = list(quantizable(model))
    q = copy.deepcopy(model)
    summary = quantize_model(q, group_size=64)
    assert summary["quantized"] == names and summary["mean_clip"] == 1.0
    mods = dict(q.named_modules())
    for n in names:
        assert isinstance(mods[n], (QuantLinear, QuantExperts))
    # router, head and embeddings stay in floating point
    floats = [n for n, m in mods.items() if isinstance(m, torch.nn.Linear)]
    assert all(n == "lm_head" or n.endswith("router") for n in floats)
    assert any(isinstance(m, QuantExperts) for m in mods.values()) == (name == "sb76b-tiny")
    out = q(ids).logits
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    assert not torch.equal(out, ref)


def test_quantize_model_refuses_modules_with_spiking_attached():
    model = build_model(model_config("sb7b-tiny"))
    attach_spiking(model, model.cfg.spike)
    with pytest.raises(ValueError, match="detach it first"):
        quantize_model(model)


def test_spiking_attaches_to_quantised_model():
    torch.manual_seed(0)
    cfg = model_config("sb76b-tiny")
    model = build_model(cfg).eval()
    quantize_model(model, 64)
    ids = torch.randint(0, 2048, (1, 24))
    plain = model(ids).logits
    attach_spiking(model, cfg.spike)
    experts = [m for m in model.modules() if isinstance(m, QuantExperts)]
    assert experts and all(m.hidden_fn is not None for m in experts)
    assert not torch.equal(model(ids).logits, plain)


def test_input_importance_is_the_mean_square_of_the_spiked_inputs():
    torch.manual_seed(0)
    cfg = model_config("sb76b-tiny")
    model = build_model(cfg).eval()
    attach_spiking(model, cfg.spike)
    batches = [{"input_ids": torch.randint(0, 2048, (2, 32)),
                "position_ids": torch.arange(32).repeat(2, 1)}]
    seen = {}
    lin = model.layers[0].attn.o_proj
    handle = lin.register_forward_pre_hook(lambda m, a: seen.update(x=a[0].detach().clone()))
    experts_name = next(n for n, m in model.named_modules() if isinstance(m, Experts))
    ex = model.get_submodule(experts_name)
    h2 = ex.register_forward_pre_hook(lambda m, a: seen.update(counts=a[1].clone()))
    imp = input_importance(model, batches)
    handle.remove(), h2.remove()
    x = seen["x"].flatten(0, -2)
    torch.testing.assert_close(imp["layers.0.attn.o_proj"], (x * x).mean(0))
    gate, down = imp[f"{experts_name}.gate_proj"], imp[f"{experts_name}.down_proj"]
    assert gate.shape == (ex.num_experts, cfg.hidden_size) and down.shape == (ex.num_experts, cfg.expert_size)
    used = seen["counts"] > 0
    assert bool((gate[used].sum(1) > 0).all()) and bool((gate[~used] == 0).all())
    assert bool((down[used].sum(1) > 0).all())
    assert not model.training
