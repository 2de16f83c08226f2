"""What trips a new user of the command lines: a tiny Qwen to convert and train from, settings
and model names misspelled, a sequence longer than the model's positions, a non-Qwen2 source,
readable tool output with every default in `--help`, analysis kept out of pruned checkpoints,
and sample text from another tokenizer."""
import json
import logging
import os
import shutil

import pytest
import yaml

from tests.helpers import ROOT


def make_tiny_qwen(out):
    from launch.make_synthetic_qwen import main

    main([str(out), "--tiny"])
    return out


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    return make_tiny_qwen(tmp_path_factory.mktemp("qwen") / "qwen-tiny")


def test_tiny_qwen_converts_and_trains_with_init_from(tiny_qwen, tmp_path, capsys):
    from launch.convert import main as convert
    from launch.pretrain import main as pretrain

    config = json.loads((tiny_qwen / "config.json").read_text())
    with open(os.path.join(ROOT, "conf", "model", "sb7b-tiny.yaml")) as f:
        target = yaml.safe_load(f)
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == \
        (target["hidden_size"], target["num_layers"], target["vocab_size"])
    dst = tmp_path / "sb7b-tiny-init"
    assert convert([str(tiny_qwen), str(dst), "--target", "sb7b-tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["target"] == "sb7b-tiny"
    run = tmp_path / "run"
    assert pretrain(["+model=sb7b-tiny", f"train.init_from={dst}", "train.max_steps=1",
                     "train.global_batch=2", "data.seq_len=32", "data.demo_chars=100000",
                     "data.vocab_size=512", f"data.cache_dir={tmp_path / 'cache'}",
                     f"train.run_dir={run}", "train.device=cpu", "train.log_every=1"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]


def test_other_architectures_are_refused(tiny_qwen, tmp_path):
    from model.convert import convert
    from tests.helpers import model_config

    src = tmp_path / "mistral"
    shutil.copytree(tiny_qwen, src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(ValueError, match=r"mistral/config\.json: unknown architecture "
                                         r"model_type='qwen2' \(architectures=\['MistralForCausalLM'\]\)"):
        convert(str(src), str(tmp_path / "out"), model_config("sb7b-tiny"), "sb7b-tiny")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides, message", [
    (["+model=sb7b-tiny", "train.max_stepz=3"],
     "error: unknown setting train.max_stepz; did you mean train.max_steps?"),
    (["+model=sb7b-tiny", "model.gla.feature_mapp=relu"], "did you mean model.gla.feature_map?"),
    (["+model=sb7bb"], "error: no model config 'sb7bb' (+model=sb7bb); did you mean +model=sb7b?\navailable "
                       "model configs: qwen2.5-7b, qwen2.5-7b-tiny, sb76b, sb76b-tiny, sb7b, sb7b-tiny"),
    (["+model=sb7b-tiny", "data=shardz"], "did you mean data=shards?"),
    (["model=sb7b"], "choose the model with +model=sb7b"),
    (["+model=sb7b-tiny", "data=shards", "data.path=/data/tok"],
     "data.seq_len=8192 exceeds model.max_position_embeddings=4096"),
])
def test_launcher_errors_point_the_right_way(overrides, message):
    from launch.pretrain import load_config

    with pytest.raises(SystemExit) as e:
        load_config(overrides)
    text = str(e.value)
    assert message in text and "Config search path" not in text and "use +" not in text


@pytest.mark.parametrize("script, shown", [
    ("convert", ["--dtype {bf16,fp32}   dtype of DST's tensors (default: bf16)", "(default: 5GB)"]),
    ("spikes", ["sample sequences (default: 8)", "(default: 3)", "--json"]),
    ("quantize", ["calibration sequences (default: 128)", "(default: 64)", "--json"]),
])
def test_tool_help_shows_the_defaults(script, shown, capsys):
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"launch.{script}").main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert e.value.code == 0 and all(" ".join(s.split()) in out for s in shown), out


def test_spikes_prints_a_readable_summary(tiny_run, tmp_path, capsys):
    from launch.spikes import main as spikes

    out = tmp_path / "spikes"
    assert spikes([tiny_run, "--out", str(out), "--samples", "2", "--seq-len", "32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["report", str(out / "report.json")]
    assert any(line.startswith("loss ") and "float" in line and "spiking" in line for line in lines)
    assert any(line.startswith("sparsity ternary") for line in lines) and len(lines) < 15


@pytest.fixture(scope="module")
def demo_shards(tiny_run, tmp_path_factory):
    """Token shards made with the tiny run's own (demo) tokenizer, and another tokenizer."""
    from data import prepare_demo
    from data.prepare import prepare_shards
    from data.tokenizer import train_sentencepiece
    from analysis.evaluate import load_model

    root = tmp_path_factory.mktemp("sample")
    texts = [f"def f{i}(x):\n    return x * {i} + {i % 3}\n" * 5 for i in range(40)]
    (root / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    demo = prepare_demo(load_model(tiny_run).run.data).tokenizer
    other = train_sentencepiece(texts * 5, 300, root / "other.model")
    for name, tok in (("demo", demo), ("other", other)):
        prepare_shards([str(root / "text.jsonl")], root / name, tokenizer=tok.path, progress=False)
    return {"demo": root / "demo", "other": root / "other", "demo_tok": demo.path, "other_tok": other.path}


def test_sample_text_from_another_tokenizer(tiny_run, demo_shards, tmp_path, capsys, caplog):
    from launch.convert import main as convert
    from launch.spikes import main as spikes
    from analysis.evaluate import check_sample_tokenizer, load_model

    args = ["--samples", "2", "--seq-len", "32", "--out", str(tmp_path / "spikes")]
    assert spikes([tiny_run, "--data", str(demo_shards["other"]), *args]) == 1  # the run's own is the demo's
    assert "was tokenized by another tokenizer" in capsys.readouterr().err
    export = tmp_path / "export"
    assert convert(["--export", tiny_run, str(export), "--dtype", "fp32"]) == 0
    assert (export / "tokenizer.model").is_file()  # exports carry the run data's tokenizer
    with pytest.raises(ValueError, match="was tokenized by another tokenizer"):
        check_sample_tokenizer(load_model(str(export)), str(demo_shards["other"]))
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        (export / name).unlink(missing_ok=True)
    with caplog.at_level(logging.WARNING, logger="train"):  # no tokenizer files: only a warning
        check_sample_tokenizer(load_model(str(export)), str(demo_shards["other"]))
    assert "tokenizer of" in caplog.text and "is unknown" in caplog.text
    shutil.copy(demo_shards["demo_tok"], export / "tokenizer.model")
    check_sample_tokenizer(load_model(str(export)), str(demo_shards["demo"]))
    assert spikes([str(export), "--data", str(demo_shards["other"]), *args]) == 1
    err = capsys.readouterr().err
    assert f"--data {demo_shards['other']} was tokenized by another tokenizer" in err
    assert not (tmp_path / "spikes").exists()
