"""W8ASpike end to end: calibrate a trained tiny model, export, reload, evaluate; the CLI."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from model.hf import load_hf_checkpoint
from model.hf.quantized import load_quantized
from analysis.evaluate import data_config, evaluate_loss, load_model, sample_batches
from analysis.quantize import REPORT_FILE, w8aspike
from tests.helpers import ROOT, train_tiny

SMALL = dict(samples=4, eval_samples=4, batch_size=4, seq_len=32)


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_run")
    return train_tiny(str(root / "run"), str(root / "cache"), model="sb76b-tiny", steps=4)


def test_report_export_and_reload_give_the_same_loss(tiny_run, tmp_path):
    dst = str(tmp_path / "q")
    report = w8aspike(tiny_run, dst, group_size=64, k=2.0, dtype=torch.float32, **SMALL)
    assert set(report["loss"]) == {"float", "spike", "w8", "w8aspike", "w8aspike_uncalibrated"}
    assert report["k"] == 2.0 and report["eval"] == {"samples": 4, "tokens": report["eval"]["tokens"], "skip": 4}
    assert all(abs(d) < 0.5 for d in report["delta"].values())
    assert report["loss"]["w8aspike"] != report["loss"]["float"]
    with open(os.path.join(dst, REPORT_FILE)) as f:
        assert json.load(f) == json.loads(json.dumps(report))
    with open(os.path.join(dst, "config.json")) as f:
        q = json.load(f)["quantization_config"]
    assert q["quant_method"] == "w8aspike" and q["group_size"] == 64 and q["spike"]["k"] == 2.0
    assert q["calibration"]["samples"] == 4
    with safe_open(os.path.join(dst, "model-00001-of-00001.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.attn.q_proj.weight").dtype == torch.int8
        assert f.get_tensor("model.layers.0.attn.q_proj.weight_scale").shape == (128, 2)
        assert f.get_tensor("model.embeddings.weight").dtype == torch.float32

    # the export reloads into the model that was evaluated: same loss on the same tokens
    loaded = load_model(dst)
    assert loaded.model_cfg.spike.enabled and loaded.model_cfg.spike.k == 2.0
    data = data_config(load_model(tiny_run), seq_len=32)
    evals = sample_batches(data, 4, batch_size=4, skip=4)
    assert evaluate_loss(loaded.model, evals)["loss"] == pytest.approx(report["loss"]["w8aspike"], abs=1e-6)
    # without its spiking (as the firing analysis loads it first) it is the INT8-only model
    plain = load_model(dst, spike=False)
    assert not plain.model_cfg.spike.enabled
    assert not any(m._forward_pre_hooks for m in plain.model.modules())
    assert evaluate_loss(plain.model, evals)["loss"] == pytest.approx(report["loss"]["w8"], abs=1e-6)


def test_moe_model_quantises_its_experts(moe_run, tmp_path):
    dst = str(tmp_path / "q")
    report = w8aspike(moe_run, dst, group_size=32, dtype=torch.float32, **SMALL)
    with open(os.path.join(dst, "config.json")) as f:
        modules = json.load(f)["quantization_config"]["modules"]
    assert "layers.1.mlp.experts" in modules and "layers.1.mlp.router" not in modules
    cfg, model = load_quantized(dst)
    names = dict(model.named_modules())
    assert type(names["layers.1.mlp.experts"]).__name__ == "QuantExperts"
    assert names["layers.1.mlp.experts"].hidden_fn is not None  # spiking attached on load
    assert report["params"]["int8"] > 0 and report["modules"] > 0


def test_quantized_export_cannot_initialise_training(tiny_run, tmp_path):
    dst = str(tmp_path / "q")
    w8aspike(tiny_run, dst, **SMALL)
    with pytest.raises(ValueError, match="quantization_config"):
        load_hf_checkpoint(dst)


def test_bad_settings_fail_before_writing(tiny_run, tmp_path):
    dst = tmp_path / "q"
    with pytest.raises(ValueError, match="--group-size"):
        w8aspike(tiny_run, str(dst), group_size=0, **SMALL)
    with pytest.raises(ValueError, match="--k"):
        w8aspike(tiny_run, str(dst), k=0.0, **SMALL)
    with pytest.raises(ValueError, match="not a token shard directory"):
        w8aspike(tiny_run, str(dst), data_path=str(tmp_path), **SMALL)
    assert not dst.exists()
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        w8aspike(tiny_run, str(dst), **SMALL)
    assert (dst / "keep.txt").read_text() == "mine"


def cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "quantize.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_cli_writes_export_and_report(tiny_run, tmp_path):
    dst = tmp_path / "q"
    r = cli(tiny_run, str(dst), "--samples", "2", "--eval-samples", "2", "--seq-len", "32", "--device", "cpu",
            "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["exported"] == str(dst) and (dst / REPORT_FILE).is_file() and (dst / "config.json").is_file()
    r = cli(tiny_run, str(dst), "--samples", "2")
    assert r.returncode == 1 and "already exists" in r.stderr
    r = cli(str(tmp_path / "missing"), str(tmp_path / "out"))
    assert r.returncode == 1 and "missing" in r.stderr and not (tmp_path / "out").exists()


def test_damaged_export_is_refused_naming_the_file(tiny_run, tmp_path):
    dst = tmp_path / "q"
    w8aspike(tiny_run, str(dst), group_size=64, **SMALL)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"]["group_size"] = 32   # scales no longer fit the weights
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="weight_scale"):
        load_quantized(str(dst))
    del config["quantization_config"]["spike"]
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json: quantization_config is incomplete"):
        load_quantized(str(dst))


def test_firing_analysis_of_an_export_reads_token_shards(tiny_run, tmp_path):
    """A W8ASpike export carries no run config: `launch/spikes.py DST --data SHARDS` analyses it
    (the loss "float" is then INT8 without spikes)."""
    from data import prepare_demo
    from data.prepare import prepare_shards
    from launch.spikes import main as spikes

    dst = str(tmp_path / "q")
    report = w8aspike(tiny_run, dst, **SMALL)
    demo = prepare_demo(load_model(tiny_run).run.data)
    src = tmp_path / "text.jsonl"
    src.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n" * 6}) + "\n"
                           for i in range(30)))
    prepare_shards([str(src)], tmp_path / "shards", tokenizer=demo.tokenizer.path, progress=False)
    assert spikes([dst, "--samples", "2", "--seq-len", "32"]) == 1  # no run config: needs --data
    out = tmp_path / "spikes"
    assert spikes([dst, "--data", str(tmp_path / "shards"), "--samples", "2", "--seq-len", "32",
                   "--out", str(out)]) == 0
    got = json.loads((out / "report.json").read_text())
    assert got["k"] == report["k"] and got["data"]["source"] == "--data"
    assert got["loss"]["spiking"] != got["loss"]["float"]
