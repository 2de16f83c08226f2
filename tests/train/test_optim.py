"""Optimizer parameter groups and the learning-rate schedule."""
import math

import pytest

from model import build_model
from tests.helpers import model_config
from train.config import TrainConfig
from train.optim import build_optimizer, lr_at


def test_no_weight_decay_on_norms_and_biases():
    model = build_model(model_config("sb7b-tiny"))
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert all(n.endswith("bias") or "norm" in n for n in no_decay_names)
    assert "layers.0.attn.q_proj.bias" in no_decay_names and "norm.weight" in no_decay_names
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "embeddings.weight" in decay_names and "layers.1.attn.q_proj.weight" in decay_names
    assert len(decay_names) + len(no_decay_names) == len(names)
    # AdamW's decoupled decay: the update of a decayed weight with zero gradient is -lr*wd*w
    p = decay["params"][0]
    before = p.detach().clone()
    for q in model.parameters():
        q.grad = q.detach() * 0
    opt.param_groups[0]["lr"] = opt.param_groups[1]["lr"] = 0.5
    opt.step()
    assert (p.detach() - before * (1 - 0.5 * 0.1)).abs().max() < 1e-6


def test_warmup_then_cosine():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(1, cfg) == pytest.approx(0.1)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(500, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(1, TrainConfig(lr=2.0, warmup_steps=0, max_steps=5)) == pytest.approx(
        0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi / 5)))
