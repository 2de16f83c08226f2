"""Starting a run from a converted checkpoint: `train.init_from=DST`."""
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from data.config import DataConfig
from model.hf import load_hf_checkpoint
from parallel import Mesh, ParallelConfig
from tests.helpers import ROOT, model_config, tiny_qwen2
from train import RunConfig, build
from train.config import TrainConfig


def convert_tiny(tmp, target):
    """A random Qwen2 with the dims of `target` (a -tiny config), converted by the command line."""
    c = model_config(target)
    tiny_qwen2(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
               num_layers=c.num_layers, num_heads=c.num_heads,
               num_kv_heads=c.num_kv_heads).save_pretrained(tmp / "qwen")
    r = subprocess.run([sys.executable, f"{ROOT}/launch/convert.py", str(tmp / "qwen"), str(tmp / target),
                        "--target", target, "--dtype", "fp32"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return tmp / target


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_tiny(tmp_path_factory.mktemp("convert"), "sb7b-tiny")


def run_cfg(tmp_path, model, init_from, steps=12):
    data = DataConfig(seq_len=64, demo_chars=200_000, vocab_size=512, cache_dir=str(tmp_path / "cache"))
    train = TrainConfig(max_steps=steps, global_batch=4, lr=3e-3, warmup_steps=2, log_every=1,
                        run_dir=str(tmp_path / "run"), init_from=str(init_from))
    return RunConfig(model=model_config(model), data=data, train=train)


@pytest.mark.parametrize("target", ["sb7b-tiny", "sb76b-tiny"])
def test_training_starts_from_the_converted_weights_and_learns(target, tmp_path):
    converted = convert_tiny(tmp_path, target)
    trainer = build(run_cfg(tmp_path, target, converted), Mesh(ParallelConfig(), "cpu"))
    _, expected = load_hf_checkpoint(str(converted))
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    losses = [row["loss"] for row in trainer.fit()]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_mismatching_model_is_refused_naming_the_setting(converted, tmp_path):
    with pytest.raises(ValueError, match="model"):
        build(run_cfg(tmp_path, "qwen2.5-7b-tiny", converted), Mesh(ParallelConfig(), "cpu"))
    cfg = run_cfg(tmp_path, "sb7b-tiny", converted)
    cfg.model = model_config("sb7b-tiny", intermediate_size=256)
    with pytest.raises(ValueError, match="intermediate_size"):
        build(cfg, Mesh(ParallelConfig(), "cpu"))
