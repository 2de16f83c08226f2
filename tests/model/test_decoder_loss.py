"""The decoder's loss (chunked `linear_cross_entropy` behind `Decoder.head_loss`) against the formula
it replaced: cross-entropy of the full logits `model(ids).logits`, in loss_sum and in the gradient
of every parameter; for untied, tied, spiking (head included) and int8-head models."""
import pytest
import torch
import torch.nn.functional as F

import model.decoder as decoder
from model import build_model
from model.decoder import IGNORE_INDEX
from model.quant import quantize_model
from tests.helpers import model_config

SPIKE_HEAD = {"enabled": True, "k": 3.0, "targets": ["attn", "mlp", "experts", "head"]}


def batch(vocab, seed=0):
    """Two rows of 29 tokens, the first packing documents of 11 and 18, with ignored labels."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 29), generator=gen)
    pos = torch.stack([torch.cat([torch.arange(11), torch.arange(18)]), torch.arange(29)])
    labels = torch.randint(0, vocab, (2, 29), generator=gen)
    labels[:, -1] = IGNORE_INDEX
    labels[0, 10] = IGNORE_INDEX
    return ids, pos, labels


def old_formula(model, ids, pos, labels):
    logits = model(ids, position_ids=pos).logits
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def loss_and_grads(model, loss_fn, autocast=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = loss_fn()
    (0.1 * loss).backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(model, autocast=False):
    ids, pos, labels = batch(model.cfg.vocab_size)
    new = loss_and_grads(model, lambda: model(ids, position_ids=pos, labels=labels).loss_sum, autocast)
    old = loss_and_grads(model, lambda: old_formula(model, ids, pos, labels), autocast)
    return new, old


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def counting_chunked_calls(monkeypatch):
    calls = []
    real = decoder.linear_cross_entropy
    monkeypatch.setattr(decoder, "linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("name, overrides", [
    ("qwen2.5-7b-tiny", {}), ("sb7b-tiny", {}), ("sb76b-tiny", {}),
    ("sb7b-tiny", {"tie_word_embeddings": True}), ("sb7b-tiny", {"spike": SPIKE_HEAD}),
])
def test_loss_and_gradients_equal_the_full_logits_formula(monkeypatch, name, overrides):
    torch.manual_seed(0)
    model = build_model(model_config(name, **overrides))
    calls = counting_chunked_calls(monkeypatch)
    (new_loss, new_grads), (old_loss, old_grads) = compare(model)
    assert calls == [1]  # the chunked path ran, spiking hooks on the head included
    torch.testing.assert_close(new_loss, old_loss, rtol=1e-6, atol=0)
    assert new_grads.keys() == old_grads.keys() == {n for n, _ in model.named_parameters()}
    for n, g in old_grads.items():  # fp32 summation order alone differs (measured <= 1e-6)
        assert rel_err(new_grads[n], g) < 1e-5, n


def test_spiked_head_input_reaches_the_chunked_loss():
    """With the head spiked, the loss differs from the unspiked head's: the hook was applied."""
    torch.manual_seed(0)
    model = build_model(model_config("sb7b-tiny", spike=SPIKE_HEAD))
    ids, pos, labels = batch(model.cfg.vocab_size)
    spiked = model(ids, position_ids=pos, labels=labels).loss_sum
    model.lm_head._forward_pre_hooks.clear()
    plain = model(ids, position_ids=pos, labels=labels).loss_sum
    assert not torch.allclose(spiked, plain)


def test_bf16_autocast_loss_matches_the_old_formula():
    torch.manual_seed(0)
    model = build_model(model_config("sb7b-tiny"))
    (new_loss, new_grads), (old_loss, old_grads) = compare(model, autocast=True)
    torch.testing.assert_close(new_loss, old_loss, rtol=1e-4, atol=0)
    for n in ("lm_head.weight", "norm.weight", "embeddings.weight"):
        assert rel_err(new_grads[n], old_grads[n]) < 2e-2, n


def test_int8_head_takes_the_full_logits(monkeypatch):
    torch.manual_seed(0)
    model = build_model(model_config("sb7b-tiny"))
    quantize_model(model, group_size=64, targets=("head",))
    calls = counting_chunked_calls(monkeypatch)
    ids, pos, labels = batch(model.cfg.vocab_size)
    with torch.no_grad():
        loss = model(ids, position_ids=pos, labels=labels).loss_sum
        torch.testing.assert_close(loss, old_formula(model, ids, pos, labels), rtol=0, atol=0)
    assert calls == []


def test_module_with_forward_hook_on_the_head_takes_the_full_logits(monkeypatch):
    torch.manual_seed(0)
    model = build_model(model_config("sb7b-tiny"))
    seen = []
    model.lm_head.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    calls = counting_chunked_calls(monkeypatch)
    ids, pos, labels = batch(model.cfg.vocab_size)
    model(ids, position_ids=pos, labels=labels)
    assert calls == [] and seen == [(58, model.cfg.vocab_size)]
