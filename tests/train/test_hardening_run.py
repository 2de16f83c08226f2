"""Run-directory faults and rough edges (issue 14): torn metrics lines, refused launches that
wrote files, unusable run directories, `train.resume=never` in a used directory, rows of a run
killed before its first checkpoint, demo-cache leftovers, the logged windows after a resume and
what the console names (CPU, tiny models)."""
import dataclasses
import errno
import fcntl
import logging
import os

import pytest

from data.config import DataConfig
from data.demo import cache_key, prepare_demo
from parallel import Mesh, ParallelConfig
from tests.helpers import model_config
from tests.train.test_checkpoint import fit, metrics
from tests.train.test_trainer import data_cfg, make_cfg  # noqa: F401  (fixture)
from train import build, run
from train.checkpoint import complete_checkpoints, latest_checkpoint
from train.export import export_checkpoint

TIMED = {"tokens_per_s", "tflops_per_gpu", "mfu", "save_stall_s",  # wall-clock values
         "host_mem_gib", "peak_mem_gib"}  # and the memory the process happens to hold


def test_torn_last_metrics_line_is_repaired_on_resume(data_cfg, tmp_path, caplog):
    cfg = make_cfg(data_cfg, tmp_path, max_steps=4)
    fit(cfg, stop_after=2)
    path = tmp_path / "run" / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 3, "loss": 5.1')  # a crash mid-append
    with caplog.at_level(logging.WARNING, "train"):
        fit(cfg)
    assert f"{path}: dropped a torn last line" in caplog.text
    assert [r["step"] for r in metrics(cfg.train.run_dir)] == [1, 2, 3, 4]


def test_damaged_middle_metrics_line_is_an_error_naming_file_and_line(data_cfg, tmp_path):
    cfg = make_cfg(data_cfg, tmp_path, max_steps=4)
    fit(cfg, stop_after=3)
    path = tmp_path / "run" / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[1][:10] + "\n" + lines[2])
    with pytest.raises(ValueError, match=f"{path}, line 2: damaged row"):
        fit(cfg)


def test_refused_launch_leaves_the_run_directory_alone(data_cfg, tmp_path):
    cfg = make_cfg(data_cfg, tmp_path, max_steps=2)
    run(cfg)
    files = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    other_model = make_cfg(data_cfg, tmp_path, max_steps=3)
    other_model.model = model_config("sb7b-tiny", rope_theta=1.0e5)
    with pytest.raises(ValueError, match="model.rope_theta"):
        run(other_model)
    bad_path = make_cfg(DataConfig(name="shards", path=str(tmp_path / "shardz"), seq_len=64), tmp_path, max_steps=3)
    with pytest.raises(ValueError, match="shardz"):
        run(bad_path)
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == files


def test_run_dir_that_is_a_file_is_named(data_cfg, tmp_path):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(ValueError, match=f"train.run_dir={tmp_path / 'run'}: .*not a directory"):
        run(make_cfg(data_cfg, tmp_path))


def test_read_only_run_dir_is_named(data_cfg, tmp_path, monkeypatch):
    """The filesystem refuses the first write into the run directory (as a read-only mount does)."""
    target = str(tmp_path / "run")
    makedirs = os.makedirs

    def read_only(path, *args, **kwargs):
        if os.path.abspath(path).startswith(target):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return makedirs(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", read_only)
    with pytest.raises(ValueError, match=f"train.run_dir={target}: cannot write .*Read-only file system"):
        run(make_cfg(data_cfg, tmp_path))


def test_resume_never_in_a_used_run_dir_is_refused_and_overwrite_starts_clean(data_cfg, tmp_path, caplog):
    fit(make_cfg(data_cfg, tmp_path, max_steps=3, save_every=1))
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="train.overwrite=true.*train.resume=auto.*train.run_dir"):
        build(make_cfg(data_cfg, tmp_path, max_steps=2, resume="never"), Mesh(ParallelConfig(), "cpu"))
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    with caplog.at_level(logging.WARNING, "train"):
        trainer = fit(make_cfg(data_cfg, tmp_path, max_steps=2, save_every=1, overwrite=True))
    assert trainer.step == 2 and "train.overwrite=true: deleted" in caplog.text
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2]
    assert complete_checkpoints(str(tmp_path / "run")) == ["step_00000001", "step_00000002"]


def test_overwrite_cannot_resume_from_a_path(data_cfg, tmp_path):
    with pytest.raises(ValueError, match="train.overwrite"):
        make_cfg(data_cfg, tmp_path, resume=str(tmp_path), overwrite=True)


def test_run_killed_before_its_first_checkpoint_leaves_no_duplicate_rows(data_cfg, tmp_path):
    cfg = make_cfg(data_cfg, tmp_path, max_steps=3)
    trainer = build(cfg, Mesh(ParallelConfig(), "cpu"))
    train_step = trainer.train_step

    def killed_in_step_2():
        if trainer.step == 2:
            raise KeyboardInterrupt
        return train_step()

    trainer.train_step = killed_in_step_2
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    trainer.loader.close()
    assert latest_checkpoint(cfg.train.run_dir) is None and len(metrics(cfg.train.run_dir)) == 1
    fit(cfg)
    assert [r["step"] for r in metrics(cfg.train.run_dir)] == [1, 2, 3]


def test_stale_demo_cache_temporaries_are_removed(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path), demo_chars=40_000, vocab_size=400)
    folder = tmp_path / "demo"
    folder.mkdir()
    other = cache_key(dataclasses.replace(cfg, vocab_size=500))
    stale = [folder / f".{cache_key(cfg)}.tmp-killed", folder / f".{other}.tmp-killed"]
    busy = folder / ".busy-key.tmp-building"  # another process is building this one now
    for p in (*stale, busy):
        p.mkdir()
        (p / "tokens.npy").write_bytes(b"half")
    with open(folder / ".busy-key.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        prepare_demo(cfg)
    assert not any(p.exists() for p in stale) and busy.is_dir()
    assert sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name) == [busy.name]


@pytest.mark.parametrize("model", ["sb7b-tiny", "sb76b-tiny"])
def test_resumed_run_logs_the_rows_of_an_uninterrupted_run(data_cfg, tmp_path, model):
    """A resume in the middle of a logging window continues that window (loss and expert load)."""
    whole = make_cfg(data_cfg, tmp_path / "whole", model, max_steps=7, log_every=3)
    fit(whole)
    parts = make_cfg(data_cfg, tmp_path / "parts", model, max_steps=7, log_every=3)
    fit(parts, stop_after=4)
    fit(parts)
    a, b = metrics(whole.train.run_dir), metrics(parts.train.run_dir)
    assert [r["step"] for r in a] == [1, 3, 6, 7]
    assert [{k: v for k, v in r.items() if k not in TIMED} for r in b] == \
        [{k: v for k, v in r.items() if k not in TIMED} for r in a]


def test_console_names_the_run_dir_init_from_and_summary(data_cfg, tmp_path, caplog, capsys):
    cfg = make_cfg(data_cfg, tmp_path / "a", max_steps=1)
    with caplog.at_level(logging.INFO, "train"):
        run(cfg)
    assert f"run directory {tmp_path / 'a' / 'run'}" in caplog.text
    export_checkpoint(cfg.train.run_dir, str(tmp_path / "hf"))
    init = make_cfg(data_cfg, tmp_path / "b", max_steps=1, init_from=str(tmp_path / "hf"))
    caplog.clear()
    with caplog.at_level(logging.INFO, "train"):
        trainer = fit(init)
    tensors = len(trainer.model.state_dict())
    assert f"initialised from {tmp_path / 'hf'} ({tensors} tensors)" in caplog.text
    run(make_cfg(data_cfg, tmp_path / "c", dry_run=True))
    assert f"summary written to {tmp_path / 'c' / 'run' / 'summary.json'}" in capsys.readouterr().out
