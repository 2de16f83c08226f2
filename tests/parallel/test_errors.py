"""Misconfigurations of the parallel engine are clear errors, raised before any model memory is
allocated (the model is still on the meta device) and naming the setting to change."""
import importlib

import pytest

from parallel import Mesh, ParallelConfig
from tests.parallel.workers import make_config
from train import build

DATA = dict(seq_len=32, demo_chars=50_000, vocab_size=512)


@pytest.fixture
def no_allocation(monkeypatch):
    def refuse(*_):
        raise AssertionError("model memory was allocated before the error")
    monkeypatch.setattr(importlib.import_module("train.build"), "materialize", refuse)


@pytest.mark.parametrize("settings,message", [
    (dict(zero_stage=4), "parallel.zero_stage must be 0, 1, 2, 3 or -1"),
    (dict(zero_stage=2, offload_optimizer=True), "parallel.offload_optimizer=true needs parallel.zero_stage=3"),
    (dict(dp=-1), "parallel.dp must be >= 0"),
    (dict(backend="mpi"), "parallel.backend must be auto, nccl or gloo"),
])
def test_bad_parallel_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**settings)


def test_auto_stage():
    assert [ParallelConfig().stage_for(dp) for dp in (1, 2, 8)] == [0, 1, 1]
    assert ParallelConfig(offload_optimizer=True).stage_for(4) == 3
    assert ParallelConfig(zero_stage=2).stage_for(1) == 2


def run_config(tmp_path, parallel=None, **train):
    t = dict(max_steps=1, global_batch=4, run_dir=str(tmp_path / "run"), device="cpu")
    t.update(train)
    return make_config(dict(model="sb7b-tiny", data=dict(DATA, cache_dir=str(tmp_path / "cache")),
                            parallel=parallel or {}, train=t))


@pytest.mark.parametrize("settings,message", [
    (dict(parallel=dict(offload_optimizer=True)), "offload_optimizer=true offloads GPU state.*cpu"),
    (dict(micro_batch=3), r"train.micro_batch=3 must divide the per-rank batch 4"),
])
def test_refused_before_allocation(tmp_path, no_allocation, settings, message):
    cfg = run_config(tmp_path, **settings)
    with pytest.raises(ValueError, match=message):
        build(cfg, Mesh(cfg.parallel, "cpu"))


def test_world_without_rendezvous(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="no MASTER_ADDR: start multi-rank runs with torchrun"):
        Mesh(ParallelConfig(), "cpu")


def test_degrees_must_match_the_world(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(ValueError, match=r"parallel.dp=3 x parallel.pp=1 x parallel.sp=1 does not match the world size 4"):
        Mesh(ParallelConfig(dp=3), "cpu")
    # expert parallelism is carved out of dp: it must divide it
    with pytest.raises(ValueError, match=r"parallel.ep=3 must divide the data-parallel size 4"):
        Mesh(ParallelConfig(ep=3), "cpu")
