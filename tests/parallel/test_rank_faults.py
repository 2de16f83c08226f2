"""Faults one rank meets that every rank must hear of (2 gloo ranks): the first checkpoint's size
is known before any save (all ranks' staged bytes), a run-directory failure of rank 0."""
import os

from tests.parallel.ranks import run_ranks


def test_first_save_on_two_ranks_is_refused_when_the_disk_is_too_small(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    out = run_ranks(2, "tests.parallel.rank_fault_workers:full_disk_first_save",
                    {"run_dir": str(run_dir), "cache": str(tmp_path / "cache")})
    for kind, message, folders, step in out:
        assert kind == "TrainingError" and "no space left on" in message and "step_00000002" in message
        assert "needs" in message and "0.00 MB free" in message  # sized before writing
        assert folders == [] and step == 2  # nothing written, not even a temporary folder


def test_later_saves_on_two_ranks(tmp_path):
    out = run_ranks(2, "tests.parallel.rank_fault_workers:saves_every_two_steps",
                    {"run_dir": str(tmp_path / "run"), "cache": str(tmp_path / "cache")})
    assert out == [["latest", "step_00000002", "step_00000004"], 4]


def test_rank_zero_failing_to_start_the_run_dir_stops_every_rank(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "config.yaml").mkdir(parents=True)
    out = run_ranks(2, "tests.parallel.rank_fault_workers:rank0_cannot_write",
                    {"run_dir": str(run_dir), "cache": str(tmp_path / "cache")})
    assert "config.yaml" in out[0]
    assert out[1].startswith("rank 0 stopped the run: ") and "config.yaml" in out[1]
    assert os.path.isdir(run_dir / "config.yaml")
