"""The command line: model choice, override errors, dry run, python and torchrun launches."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

SCRIPT = os.path.join(ROOT, "launch", "pretrain.py")


def launch(*args, cmd=None, tmp_path=None, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if tmp_path is not None:
        env["SPIKINGBRAIN_CACHE"] = str(tmp_path / "cache")
    return subprocess.run((cmd or [sys.executable]) + [SCRIPT, *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=tmp_path or ROOT)


def small_run(tmp_path, *extra):
    return ("+model=sb7b-tiny", "train.max_steps=3", "train.global_batch=4", "data.seq_len=32",
            "data.demo_chars=100000", "data.vocab_size=512", f"train.run_dir={tmp_path / 'run'}",
            "train.log_every=1", "train.device=cpu", *extra)


def test_missing_model_lists_the_choices():
    r = launch()
    assert r.returncode != 0
    assert "+model=NAME" in r.stderr
    for name in ("qwen2.5-7b", "sb7b", "sb76b", "sb7b-tiny"):
        assert name in r.stderr


@pytest.mark.parametrize("args, message", [
    (["+model=sb9b"], "sb9b"),
    (["+model=sb7b-tiny", "train.max_stepz=3"], "train.max_stepz"),
    (["+model=sb7b-tiny", "train.max_steps=three"], "train.max_steps must be an integer"),
    (["+model=sb7b-tiny", "data.seq_len=0"], "data.seq_len"),
    (["+model=sb7b-tiny", "model.num_kv_heads=3"], "model.num_kv_heads"),
    (["+model=sb7b-tiny", "parallel.pp=2"], "parallel.pp"),
])
def test_bad_overrides_are_named(args, message):
    r = launch(*args)
    assert r.returncode != 0
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_dry_run_writes_summary_and_allocates_nothing(tmp_path):
    (tmp_path / "config.yaml").write_text("a training run's config\n")
    r = launch("+model=sb76b", "train.dry_run=true", f"train.run_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 75.0e9 <= summary["params_total"] <= 78.0e9
    assert 11.5e9 <= summary["params_active"] <= 13.0e9
    assert summary["config"]["model"]["name"] == "sb76b"
    assert "76.07B" in r.stdout
    # a dry run into a run directory leaves the run's files as they are
    assert (tmp_path / "config.yaml").read_text() == "a training run's config\n"
    assert not (tmp_path / "metrics.jsonl").exists()


def test_python_launch_trains_and_logs(tmp_path):
    r = launch(*small_run(tmp_path), tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert not (tmp_path / "outputs").exists()  # no Hydra output folders


def test_torchrun_one_and_two_ranks_agree(tmp_path):
    """torchrun works with one rank, and two data-parallel ranks (gloo) reproduce its losses."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    one = launch(*small_run(tmp_path / "one"), cmd=torchrun + ["--nproc-per-node", "1"],
                 tmp_path=tmp_path)
    assert one.returncode == 0, one.stderr
    two = launch(*small_run(tmp_path / "two"), cmd=torchrun + ["--nproc-per-node", "2"],
                 tmp_path=tmp_path)
    assert two.returncode == 0, two.stderr
    assert "FutureWarning" not in one.stderr + two.stderr  # e.g. DDP's deprecated broadcast_buffers
    read = lambda d: [json.loads(x) for x in (d / "run" / "metrics.jsonl").read_text().splitlines()]
    a, b = read(tmp_path / "one"), read(tmp_path / "two")
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    assert [r["tokens"] for r in b] == [r["tokens"] for r in a]
