"""Qwen2 faithfulness: a random Hugging Face Qwen2ForCausalLM and our decoder give the same logits."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from model import build_model
from model.hf import qwen2_config, qwen2_from_hf, qwen2_to_hf
from tests.helpers import tiny_qwen2


def ours_from(hf_model):
    cfg = qwen2_config(hf_model.config.to_dict())
    model = build_model(cfg, init=False)
    missing, unexpected = model.load_state_dict(
        qwen2_from_hf(hf_model.state_dict(), cfg.tie_word_embeddings), strict=True)
    assert not missing and not unexpected
    return model.eval()


@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_transformers(tie):
    hf = tiny_qwen2(tie=tie)
    ours = ours_from(hf)
    ids = torch.randint(0, 503, (2, 45))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids).logits
    assert (got - expected).abs().max().item() <= 1e-4


def test_packed_positions_match_transformers_per_document():
    """Two documents in one row equal running each through transformers alone."""
    hf = tiny_qwen2()
    ours = ours_from(hf)
    ids = torch.randint(0, 503, (1, 30))
    pos = torch.cat([torch.arange(12), torch.arange(18)])[None]
    with torch.no_grad():
        got = ours(ids, position_ids=pos).logits
        first, second = hf(ids[:, :12]).logits, hf(ids[:, 12:]).logits
    assert (got - torch.cat([first, second], 1)).abs().max().item() <= 1e-4


def test_state_dict_round_trip_names():
    hf = tiny_qwen2()
    ours = ours_from(hf)
    back = qwen2_to_hf(ours.state_dict())
    assert set(back) == set(hf.state_dict()) - {k for k in hf.state_dict() if "rotary" in k}
    for k, v in back.items():
        assert torch.equal(v, hf.state_dict()[k])


def test_rejects_other_architectures_and_sliding_window_qwen2():
    with pytest.raises(ValueError, match="qwen2"):
        qwen2_config({"model_type": "llama", "num_attention_heads": 4, "hidden_size": 8})
    cfg = tiny_qwen2().config.to_dict()
    cfg["use_sliding_window"] = True
    with pytest.raises(ValueError, match="use_sliding_window"):
        qwen2_config(cfg)
