"""Checkpoint faults (issue 14): checksums of every file, pruning after a resume from elsewhere,
a full disk during a save, damaged RNG files (CPU, tiny models)."""
import builtins
import errno
import hashlib
import io
import json
import logging
import os
import shutil

import pytest

from parallel import Mesh, ParallelConfig
from tests.train.test_checkpoint import fit, metrics
from tests.train.test_trainer import data_cfg, make_cfg  # noqa: F401  (fixture)
from train import build
from train.checkpoint import latest_checkpoint
from train.export import export_checkpoint
from train.trainer import TrainingError


def flip_byte(path, at=0.5):
    """Flips the low bit of the byte at fraction `at` of the file (tensor data in a shard file)."""
    data = bytearray(open(path, "rb").read())
    data[int(len(data) * at)] ^= 1
    open(path, "wb").write(bytes(data))


def tmp_folders(run_dir):
    return [n for n in os.listdir(os.path.join(run_dir, "checkpoints")) if ".tmp-" in n]


@pytest.fixture
def saved(data_cfg, tmp_path):
    """A run directory with a checkpoint at step 2 (of 4) and its config."""
    cfg = make_cfg(data_cfg, tmp_path, max_steps=4)
    fit(cfg, stop_after=2)
    return cfg, latest_checkpoint(cfg.train.run_dir)


def test_manifest_holds_every_file_and_its_sha256(saved):
    _, checkpoint = saved
    manifest = json.load(open(os.path.join(checkpoint, "manifest.json")))
    on_disk = sorted(os.path.relpath(os.path.join(d, f), checkpoint) for d, _, files in os.walk(checkpoint)
                     for f in files if f != "manifest.json")
    assert sorted(manifest["files"]) == on_disk
    assert {"shards/.metadata", "shards/__0_0.distcp", "rng_rank0.pt", "state.json", "config.yaml"} <= set(on_disk)
    for name, entry in manifest["files"].items():
        data = open(os.path.join(checkpoint, name), "rb").read()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


@pytest.mark.parametrize("name", ["shards/__0_0.distcp", "rng_rank0.pt", "state.json"])
def test_flipped_byte_is_refused_at_resume_and_export_naming_the_file(saved, data_cfg, tmp_path, name):
    cfg, checkpoint = saved
    file = os.path.join(checkpoint, name)
    if name == "state.json":  # still valid JSON: one digit of the save time
        text = open(file).read()
        open(file, "w").write(text.replace('"time": 1', '"time": 2'))
    else:
        flip_byte(file)
    with pytest.raises(ValueError, match=f"{file}: .*checksum"):
        build(make_cfg(data_cfg, tmp_path, max_steps=4), Mesh(ParallelConfig(), "cpu"))
    with pytest.raises(ValueError, match=f"{file}: .*checksum"):
        export_checkpoint(cfg.train.run_dir, str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


def test_truncated_file_is_named_before_hashing(saved, data_cfg, tmp_path):
    _, checkpoint = saved
    shard = os.path.join(checkpoint, "shards", "__0_0.distcp")
    os.truncate(shard, os.path.getsize(shard) - 10)
    with pytest.raises(ValueError, match=f"{shard}: .* bytes, the manifest says"):
        build(make_cfg(data_cfg, tmp_path, max_steps=4), Mesh(ParallelConfig(), "cpu"))


def drop_manifest(checkpoint):
    """Makes `checkpoint` look like one written before checkpoints carried checksums."""
    os.remove(os.path.join(checkpoint, "manifest.json"))
    state_file = os.path.join(checkpoint, "state.json")
    state = json.load(open(state_file))
    del state["manifest"]
    json.dump(state, open(state_file, "w"))


def test_checkpoint_without_manifest_loads_with_a_warning(saved, data_cfg, tmp_path, caplog):
    cfg, checkpoint = saved
    drop_manifest(checkpoint)
    with caplog.at_level(logging.WARNING, "train"):
        trainer = fit(cfg)
    assert trainer.step == 4
    assert f"{checkpoint}: no manifest.json" in caplog.text and "not verified" in caplog.text


def test_missing_manifest_of_a_new_checkpoint_is_refused(saved, data_cfg, tmp_path):
    _, checkpoint = saved
    os.remove(os.path.join(checkpoint, "manifest.json"))
    with pytest.raises(ValueError, match="manifest.json is missing"):
        build(make_cfg(data_cfg, tmp_path, max_steps=4), Mesh(ParallelConfig(), "cpu"))


@pytest.mark.parametrize("manifest", [True, False])
def test_truncated_rng_file_is_named(saved, data_cfg, tmp_path, manifest):
    _, checkpoint = saved
    if not manifest:
        drop_manifest(checkpoint)
    rng = os.path.join(checkpoint, "rng_rank0.pt")
    os.truncate(rng, 100)
    with pytest.raises(ValueError, match=f"{rng}: "):
        build(make_cfg(data_cfg, tmp_path, max_steps=4), Mesh(ParallelConfig(), "cpu"))


def test_pruning_after_resuming_from_another_run_keeps_the_new_checkpoint(data_cfg, tmp_path):
    """The run directory still holds later steps of an earlier run; the checkpoint just written
    (an earlier step) must survive pruning, and `latest` must name it."""
    other = make_cfg(data_cfg, tmp_path / "other", max_steps=1)
    fit(other)
    run = make_cfg(data_cfg, tmp_path, max_steps=5, save_every=1)  # default keep_checkpoints=3
    fit(run)
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(os.listdir(folder)) == ["latest", "step_00000003", "step_00000004", "step_00000005"]
    branch = make_cfg(data_cfg, tmp_path, max_steps=2, save_every=1,
                      resume=latest_checkpoint(other.train.run_dir))
    fit(branch)
    assert (folder / "latest").read_text().strip() == "step_00000002"
    assert sorted(os.listdir(folder)) == ["latest", "step_00000002", "step_00000004", "step_00000005"]
    again = fit(make_cfg(data_cfg, tmp_path, max_steps=3))  # the next launch resumes from it
    assert again.step == 3 and (folder / "latest").read_text().strip() == "step_00000003"


class FullDisk(io.FileIO):
    """A file on a disk that has just filled up."""

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["shards", "rng_rank0.pt"])
def test_full_disk_during_a_background_save_stops_the_run(data_cfg, tmp_path, monkeypatch, where):
    """The disk fills up while the step-2 checkpoint is written (in the background): the run stops
    with an error naming the disk and the checkpoint, the partial folder is gone and the step-1
    checkpoint is intact."""
    real_open, real_io_open = builtins.open, io.open

    def opener(real):
        def open_(file, mode="r", *args, **kwargs):
            path = os.fspath(file) if isinstance(file, (str, os.PathLike)) else ""
            if "w" in mode and "step_00000002.tmp-" in path and where in path:
                return FullDisk(path, "wb")
            return real(file, mode, *args, **kwargs)
        return open_

    monkeypatch.setattr(builtins, "open", opener(real_open))
    monkeypatch.setattr(io, "open", opener(real_io_open))
    cfg = make_cfg(data_cfg, tmp_path, max_steps=40, save_every=1)
    with pytest.raises(TrainingError, match=r"no space left on \S+ writing \S+step_00000002 \(needs [\d.]+ [GM]B"):
        fit(cfg)
    assert metrics(cfg.train.run_dir)[-1]["step"] < 40  # stopped at the failed save, not at the end
    assert latest_checkpoint(cfg.train.run_dir).endswith("step_00000001")
    assert tmp_folders(cfg.train.run_dir) == []
    monkeypatch.undo()
    assert fit(make_cfg(data_cfg, tmp_path, max_steps=2)).step == 2  # step 1 resumes (checksums verified)


def test_save_is_refused_before_writing_when_the_disk_is_too_small(data_cfg, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    cfg = make_cfg(data_cfg, tmp_path, max_steps=40, save_every=2)

    def nearly_full(path):  # room for the first checkpoint only
        return usage._replace(free=1000 if latest_checkpoint(cfg.train.run_dir) else usage.free)

    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    with pytest.raises(TrainingError, match=r"no space left on \S+ writing \S+step_00000004 "
                                            r"\(needs [\d.]+ [GM]B, 0\.00 MB free\)"):
        fit(cfg)
    assert latest_checkpoint(cfg.train.run_dir).endswith("step_00000002")
    assert tmp_folders(cfg.train.run_dir) == []
    assert [r["step"] for r in metrics(cfg.train.run_dir)] == [1, 2, 3, 4]
