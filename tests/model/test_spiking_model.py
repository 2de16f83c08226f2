"""Spike-aware models: which projections see spiked inputs, the on/off switch, training."""
import pytest
import torch
from torch import nn

from model import build_model
from model.spiking import attach_spiking, detach_spiking, target_of
from tests.helpers import model_config

SPIKE_ON = {"enabled": True, "k": 3.0, "targets": ["attn", "mlp", "experts"]}


def is_spiked(x: torch.Tensor) -> bool:
    """Every row is an integer multiple of one step (its threshold V_th). The smallest non-zero
    |x| of a row is a count of 1, 2 or 3 steps (narrow rows such as the rank-16 gate may lack a
    count of 1), so some divisor of it must make the whole row integral."""
    x = x.float().reshape(-1, x.shape[-1])
    v = torch.where(x != 0, x.abs(), torch.inf).min(-1, keepdim=True).values
    ok = ~torch.isfinite(v).squeeze(-1)  # all-zero rows
    for d in (1, 2, 3):
        counts = torch.where(torch.isfinite(v), x * d / v, torch.zeros_like(x))
        ok |= ((counts - counts.round()).abs() < 1e-3).all(-1)
    return bool(ok.all())


def captured_inputs(model, ids):
    seen = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            m.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, args[0].detach()))
    model(ids)
    return seen


@pytest.mark.parametrize("name", ["qwen2.5-7b-tiny", "sb7b-tiny", "sb76b-tiny"])
def test_selected_projections_see_spiked_inputs(name):
    torch.manual_seed(0)
    model = build_model(model_config(name, spike=SPIKE_ON))
    seen = captured_inputs(model, torch.randint(0, 2048, (2, 24)))
    for layer, x in seen.items():
        group = target_of(layer)
        assert is_spiked(x) == (group in SPIKE_ON["targets"]), (layer, group)
    assert any(target_of(n) == "head" for n in seen) and not is_spiked(seen["lm_head"])


def test_switch_off_gives_back_the_exact_full_precision_model():
    torch.manual_seed(0)
    plain = build_model(model_config("sb76b-tiny"))
    ids = torch.randint(0, 2048, (2, 24))
    want = plain(ids).logits
    handles = attach_spiking(plain, model_config("sb76b-tiny", spike=SPIKE_ON).spike)
    spiked = plain(ids).logits
    assert not torch.equal(spiked, want) and torch.isfinite(spiked).all()
    detach_spiking(plain, handles)
    assert torch.equal(plain(ids).logits, want)
    disabled = build_model(model_config("sb76b-tiny", spike={**SPIKE_ON, "enabled": False}), init=False)
    disabled.load_state_dict(plain.state_dict())
    assert torch.equal(disabled(ids).logits, want)


def test_router_and_head_can_be_spiked_too():
    torch.manual_seed(0)
    model = build_model(model_config("sb76b-tiny", spike={**SPIKE_ON, "targets": ["router", "head"]}))
    seen = captured_inputs(model, torch.randint(0, 2048, (1, 16)))
    assert is_spiked(seen["lm_head"]) and is_spiked(seen["layers.1.mlp.router"])
    assert not is_spiked(seen["layers.0.attn.q_proj"])


def test_spike_aware_training_learns_with_straight_through_gradients():
    torch.manual_seed(0)
    model = build_model(model_config("sb76b-tiny", spike=SPIKE_ON))
    ids = torch.randint(0, 2048, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        out = model(ids, labels=ids)
        loss = out.loss_sum / out.num_tokens + out.aux_loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_bad_spike_settings_are_named():
    with pytest.raises(ValueError, match="model.spike.k"):
        model_config("sb7b-tiny", spike={"enabled": True, "k": 0})
    with pytest.raises(ValueError, match="model.spike.targets"):
        model_config("sb7b-tiny", spike={"enabled": True, "targets": ["conv"]})
