"""Parameter counts of the full-size models, built on the meta device (no memory)."""
import pytest

from tests.helpers import model_config
from model import build_model


def counts(name, **overrides):
    return build_model(model_config(name, **overrides), device="meta").num_params()


def test_qwen25_7b():
    c = counts("qwen2.5-7b")
    assert c["total"] == c["active"]
    assert c["total"] == pytest.approx(7.62e9, rel=0.005)


def test_sb7b():
    c = counts("sb7b")
    assert c["total"] == c["active"]
    assert c["total"] == pytest.approx(7.62e9, rel=0.005)


def test_sb76b_shared_projections():
    c = counts("sb76b")
    assert 75.0e9 <= c["total"] <= 78.0e9
    assert 11.5e9 <= c["active"] <= 13.0e9
    # the report's figures for shared q/k/v/o
    assert c["total"] == pytest.approx(76.0e9, rel=0.005)
    assert c["active"] == pytest.approx(11.9e9, rel=0.01)


def test_sb76b_separate_projections():
    c = counts("sb76b", hybrid={"shared_qkvo": False, "num_sinks": 128})
    assert c["total"] == pytest.approx(76.9e9, rel=0.005)
    assert c["active"] == pytest.approx(12.7e9, rel=0.01)


def test_sb76b_layer_plan():
    cfg = model_config("sb76b")
    full = [i + 1 for i, m in enumerate(cfg.mixers) if m == "gla+full"]
    dense = [i + 1 for i, f in enumerate(cfg.ffns) if f == "dense"]
    assert full == [7, 14, 21, 28]  # 1-based, as the report states
    assert dense == [1, 2, 3, 5, 7, 9, 11]
    assert set(cfg.mixers) == {"gla+swa", "gla+full"}


def test_sb7b_layer_plan():
    cfg = model_config("sb7b")
    assert cfg.mixers == ["gla", "swa"] * 14
    assert cfg.sliding_window == 4096 and cfg.head_dim == 128


@pytest.mark.parametrize("name", ["qwen2.5-7b-tiny", "sb7b-tiny", "sb76b-tiny"])
def test_tiny_variants_are_tiny(name):
    cfg = model_config(name)
    assert cfg.hidden_size <= 128 and cfg.num_layers <= 4 and cfg.vocab_size <= 4096
