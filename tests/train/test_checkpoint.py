"""Checkpoints: exact resume, `latest`, pruning, crash leftovers, background writes, signals,
resume errors and skipping of non-finite steps (CPU, tiny models)."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from parallel import Mesh, ParallelConfig
from tests.helpers import model_config, stop_after as stop_at
from tests.launch.test_pretrain_cli import SCRIPT, launch, small_run
from tests.train.test_trainer import data_cfg, make_cfg  # noqa: F401  (fixture)
from train import RunConfig, build, from_dict
from train.checkpoint import CheckpointTensors, latest_checkpoint
from train.trainer import TrainingError


def fit(cfg, stop_after=None, hook=None):
    """Builds (resuming when the run dir has a checkpoint) and trains; `stop_after` asks the
    trainer to stop as a signal would once that step is done."""
    trainer = build(cfg, Mesh(ParallelConfig(), "cpu"))
    if stop_after is not None:
        stop_at(trainer, stop_after)
    if hook is not None:
        trainer.model.embeddings.register_forward_hook(hook)
    try:
        trainer.fit()
    finally:
        trainer.loader.close()
    return trainer


def full_state(checkpoint) -> dict:
    """Every tensor and value of a checkpoint's shards/ (model.* and optim.*), in one process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = os.path.join(checkpoint, "..", f"{os.path.basename(checkpoint)}.pt")
    dcp_to_torch_save(os.path.join(checkpoint, "shards"), out)
    state = torch.load(out, weights_only=False)
    os.remove(out)
    return state


def metrics(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def state_of(checkpoint):
    return json.load(open(os.path.join(checkpoint, "state.json")))


@pytest.mark.parametrize("model", ["sb7b-tiny", "sb76b-tiny"])
def test_resume_is_exact(data_cfg, tmp_path, model):
    whole = make_cfg(data_cfg, tmp_path / "whole", model, max_steps=6)
    fit(whole)
    parts = make_cfg(data_cfg, tmp_path / "parts", model, max_steps=6)
    first = fit(parts, stop_after=3)
    assert first.step == 3 and first.stop_reason == "test stop"
    assert latest_checkpoint(parts.train.run_dir).endswith("step_00000003")
    second = fit(parts)
    assert second.step == 6
    a, b = metrics(whole.train.run_dir), metrics(parts.train.run_dir)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in b] == [r["loss"] for r in a]
    assert [r["tokens"] for r in b] == [r["tokens"] for r in a]
    end_a = full_state(latest_checkpoint(whole.train.run_dir))
    end_b = full_state(latest_checkpoint(parts.train.run_dir))
    assert end_a["model"].keys() == end_b["model"].keys()
    assert all(torch.equal(end_a["model"][k], end_b["model"][k]) for k in end_a["model"])


def test_latest_files_and_pruning(data_cfg, tmp_path):
    cfg = make_cfg(data_cfg, tmp_path, max_steps=5, save_every=1, keep_checkpoints=2)
    fit(cfg)
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(os.listdir(folder)) == ["latest", "step_00000004", "step_00000005"]
    assert (folder / "latest").read_text().strip() == "step_00000005"
    names = sorted(os.listdir(folder / "step_00000005"))
    assert names == ["config.yaml", "manifest.json", "rng_rank0.pt", "shards", "state.json"]
    assert ".metadata" in os.listdir(folder / "step_00000005" / "shards")
    state = state_of(folder / "step_00000005")
    assert state["format"] == "spikingbrain-checkpoint" and state["version"] == 2
    assert (state["step"], state["tokens_seen"], state["world_size"], state["dp"], state["zero_stage"]) == \
        (5, 5 * 4 * 64, 1, 1, 0)
    assert state["skipped_steps"] == 0 and isinstance(state["loader"], dict)
    saved = from_dict(RunConfig, yaml.safe_load((folder / "step_00000005" / "config.yaml").read_text()))
    assert saved == cfg
    keep_all = make_cfg(data_cfg, tmp_path / "all", max_steps=3, save_every=1, keep_checkpoints=0)
    fit(keep_all)
    assert len(os.listdir(tmp_path / "all" / "run" / "checkpoints")) == 4


def test_half_written_checkpoint_is_ignored_and_cleaned(data_cfg, tmp_path):
    cfg = make_cfg(data_cfg, tmp_path, max_steps=4)
    fit(cfg, stop_after=2)
    folder = tmp_path / "run" / "checkpoints"
    crashed = folder / "step_00000003.tmp-deadbeef"  # a save that died before the rename
    crashed.mkdir()
    (crashed / "shards").mkdir()
    (crashed / "shards" / "__0_0.distcp").write_bytes(b"half")
    trainer = fit(cfg)
    assert trainer.step == 4
    assert sorted(os.listdir(folder)) == ["latest", "step_00000002", "step_00000004"]
    assert [r["step"] for r in metrics(cfg.train.run_dir)] == [1, 2, 3, 4]


def test_background_save_equals_blocking_save_and_snapshots(data_cfg, tmp_path):
    cfg = make_cfg(data_cfg, tmp_path, max_steps=2)
    trainer = fit(cfg)
    trainer.step = 100
    trainer.save(blocking=True)
    trainer.step = 101
    trainer.save()  # staged now, written in the background
    with torch.no_grad():  # training goes on: must not leak into the checkpoint in flight
        for p in trainer.model.parameters():
            p.add_(1.0)
    trainer.checkpointer.wait()
    folder = tmp_path / "run" / "checkpoints"
    sync, bg = folder / "step_00000100", folder / "step_00000101"
    a, b = full_state(sync), full_state(bg)
    ma, mb = a["model"], b["model"]
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) and mb[k].dtype == torch.float32 for k in ma)
    oa, ob = a["optim"], b["optim"]
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for name, s in oa["state"].items():
        assert all(torch.equal(s[k], ob["state"][name][k]) for k in s)
    assert dict(CheckpointTensors(str(bg))).keys() == mb.keys()
    sa, sb = state_of(sync), state_of(bg)
    assert {k: v for k, v in sa.items() if k not in ("step", "time")} == \
        {k: v for k, v in sb.items() if k not in ("step", "time")}
    assert (folder / "latest").read_text().strip() == "step_00000101"


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", SPIKINGBRAIN_CACHE=str(tmp_path / "cache"))
    args = [a for a in small_run(tmp_path) if not a.startswith("train.max_steps")]
    proc = subprocess.Popen([sys.executable, SCRIPT, *args, "train.max_steps=100000"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if "step 2/" in line:
                proc.send_signal(signal.SIGTERM)
                break
        out.append(proc.communicate(timeout=120)[0])
    finally:
        proc.kill()
    text = "".join(out)
    assert proc.returncode == 0, text
    assert "received SIGTERM: saved a checkpoint at step" in text
    checkpoint = latest_checkpoint(str(tmp_path / "run"))
    state = state_of(checkpoint)
    assert state["step"] >= 2
    assert [r["step"] for r in metrics(tmp_path / "run")][-1] == state["step"]


def test_resume_errors_name_the_problem(data_cfg, tmp_path):
    cfg = make_cfg(data_cfg, tmp_path, max_steps=2)
    fit(cfg)
    mesh = Mesh(ParallelConfig(), "cpu")
    missing = make_cfg(data_cfg, tmp_path, resume=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="train.resume=.*nowhere.*not a checkpoint directory"):
        build(missing, mesh)
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "state.json").write_text("{}")
    with pytest.raises(ValueError, match="incomplete is not a complete checkpoint .missing shards/.metadata"):
        build(make_cfg(data_cfg, tmp_path, resume=str(incomplete)), mesh)
    other_model = make_cfg(data_cfg, tmp_path)
    other_model.model = model_config("sb7b-tiny", rope_theta=1.0e5)
    with pytest.raises(ValueError, match="model.rope_theta"):
        build(other_model, mesh)
    shards = tmp_path / "run" / "checkpoints" / "step_00000002" / "shards"
    for name in os.listdir(shards):
        if name.endswith(".distcp"):
            (shards / name).write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="step_00000002/shards/__0_0.distcp: 100 bytes, the manifest says"):
        build(make_cfg(data_cfg, tmp_path), mesh)
    checkpoint = shards.parent  # as written before checkpoints carried a manifest: read, not verified
    os.remove(checkpoint / "manifest.json")
    (checkpoint / "state.json").write_text(json.dumps({k: v for k, v in state_of(checkpoint).items() if k != "manifest"}))
    with pytest.raises(ValueError, match="step_00000002/shards: cannot restore the model and optimizer"):
        build(make_cfg(data_cfg, tmp_path), mesh)
    fresh = build(make_cfg(data_cfg, tmp_path, resume="never", overwrite=True), mesh)  # ignores the damaged checkpoint
    assert fresh.step == 0
    fresh.loader.close()


def test_non_finite_steps_are_skipped_and_counted(data_cfg, tmp_path):
    calls = []

    def nan_on_second_step(module, inputs, output):
        calls.append(1)
        return output * float("nan") if len(calls) == 2 else output

    cfg = make_cfg(data_cfg, tmp_path, max_steps=4)
    trainer = fit(cfg, hook=nan_on_second_step)
    rows = metrics(cfg.train.run_dir)
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1]
    assert rows[1]["loss"] != rows[1]["loss"]  # NaN: the skipped step's loss
    assert all(r["loss"] == r["loss"] for r in rows[2:])  # weights stayed finite
    assert trainer.skipped_steps == 1 and state_of(latest_checkpoint(cfg.train.run_dir))["skipped_steps"] == 1

    always = make_cfg(data_cfg, tmp_path / "diverged", max_steps=10, max_skipped_steps=2)
    with pytest.raises(TrainingError, match="train.max_skipped_steps=2"):
        fit(always, hook=lambda m, i, out: out * float("nan"))


def test_resume_on_two_ranks(tmp_path):
    """A checkpoint of one process continues on two data-parallel ranks (torchrun, gloo)."""
    flat = ("train.warmup_steps=1", "train.min_lr_ratio=1.0")  # lr independent of max_steps
    whole = launch(*small_run(tmp_path / "whole", *flat, "train.max_steps=4"), tmp_path=tmp_path)
    assert whole.returncode == 0, whole.stderr
    first = launch(*small_run(tmp_path / "parts", *flat, "train.max_steps=2"), tmp_path=tmp_path)
    assert first.returncode == 0, first.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    second = launch(*small_run(tmp_path / "parts", *flat, "train.max_steps=4"), cmd=torchrun, tmp_path=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout and "at step 2" in second.stdout
    a, b = metrics(tmp_path / "whole" / "run"), metrics(tmp_path / "parts" / "run")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    assert state_of(latest_checkpoint(str(tmp_path / "parts" / "run")))["dp"] == 2
