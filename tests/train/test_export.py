"""Export: a training checkpoint back to the Hugging Face-style layout of `launch/convert.py`."""
import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from data.config import DataConfig
from model.hf import load_hf_checkpoint
from tests.helpers import ROOT, model_config
from tests.train.test_init_from import convert_tiny
from train import RunConfig, run
from train.config import TrainConfig

CONVERT = [sys.executable, os.path.join(ROOT, "launch", "convert.py")]


def tensors(directory):
    index = json.load(open(os.path.join(directory, "model.safetensors.index.json")))
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(os.path.join(directory, shard)))
    return out


@pytest.mark.parametrize("target", ["sb7b-tiny", "sb76b-tiny"])
def test_convert_load_export_round_trip_is_identical(target, tmp_path):
    """SRC -> DST (fp32) -> train one step at lr 0 -> checkpoint -> export gives DST's tensors."""
    dst = convert_tiny(tmp_path, target)
    data = DataConfig(seq_len=32, demo_chars=100_000, vocab_size=512, cache_dir=str(tmp_path / "cache"))
    train = TrainConfig(max_steps=1, global_batch=2, lr=0.0, warmup_steps=0, run_dir=str(tmp_path / "run"),
                        init_from=str(dst))
    run(RunConfig(model=model_config(target), data=data, train=train))
    r = subprocess.run(CONVERT + ["--export", str(tmp_path / "run"), str(tmp_path / "exported"), "--dtype", "fp32"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    original, exported = tensors(dst), tensors(tmp_path / "exported")
    assert set(original) == set(exported)
    for name, t in original.items():
        assert exported[name].dtype == t.dtype and (exported[name] == t).all(), name
    assert json.load(open(tmp_path / "exported" / "config.json")) == json.load(open(dst / "config.json"))
    cfg, _ = load_hf_checkpoint(str(tmp_path / "exported"), model_config(target))
    assert cfg.mixers == model_config(target).mixers


def test_export_errors_name_the_path(tmp_path):
    r = subprocess.run(CONVERT + ["--export", str(tmp_path), str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 1 and "not a checkpoint" in r.stderr
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / ".metadata").write_bytes(b"garbage")
    (tmp_path / "config.yaml").write_text("model: {name: m, hidden_size: 64, num_heads: 4, num_kv_heads: 2}\n")
    r = subprocess.run(CONVERT + ["--export", str(tmp_path), str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 1 and "shards/.metadata: cannot read the checkpoint index" in r.stderr
    assert not (tmp_path / "out").exists()


def test_written_weights_get_the_usual_permissions(tiny_run, tmp_path):
    """safetensors alone writes 0600 files; checkpoints and exports follow the umask instead
    (0644 under 022), so a team can read each other's runs."""
    import stat

    from train.export import export_checkpoint, resolve_checkpoint

    mask = os.umask(0)
    os.umask(mask)
    export_checkpoint(tiny_run, str(tmp_path / "hf"))
    for path in (os.path.join(resolve_checkpoint(tiny_run), "shards", "__0_0.distcp"),
                 str(tmp_path / "hf" / "model-00001-of-00001.safetensors")):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask, path


def test_export_carries_the_tokenizer_of_the_run_data(tmp_path):
    """A run on the demo corpus exports its sentencepiece tokenizer in a form AutoTokenizer reads,
    encoding as the run's tokenizer does."""
    from transformers import AutoTokenizer

    from data import prepare_demo
    from train.export import export_checkpoint

    data = DataConfig(seq_len=32, demo_chars=100_000, vocab_size=512, cache_dir=str(tmp_path / "cache"))
    train = TrainConfig(max_steps=1, global_batch=2, warmup_steps=0, run_dir=str(tmp_path / "run"))
    run(RunConfig(model=model_config("sb7b-tiny"), data=data, train=train))
    export_checkpoint(str(tmp_path / "run"), str(tmp_path / "exported"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "exported"), trust_remote_code=True)
    text = "The quick brown fox jumps over the lazy dog."
    assert tok.encode(text, add_special_tokens=False) == prepare_demo(data).tokenizer.encode(text)
