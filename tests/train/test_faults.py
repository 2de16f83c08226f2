"""Faults of long runs (train/faults.py, train/watchdog.py): loss spikes, the rollback after too
many skipped steps in a row, the time limit, the hang watchdog and a rank killed under torchrun
(CPU, tiny models)."""
import json
import logging
import math
import os
import subprocess
import sys

import pytest

from data import build_loader
from parallel import Mesh, ParallelConfig
from tests.helpers import ROOT, stop_after as stop_at
from tests.launch.test_pretrain_cli import launch, small_run
from tests.train.test_checkpoint import metrics, state_of
from tests.train.test_trainer import data_cfg, make_cfg  # noqa: F401  (fixture)
from train import build
from train.checkpoint import latest_checkpoint
from train.config import TrainConfig
from train.faults import Faults, TimeLimit
from train.trainer import TrainingError
from train.watchdog import HANG_EXIT_CODE, hang_file

WORKER = os.path.join(ROOT, "tests", "train", "faults_worker.py")
# the values of a row that a run reproduces exactly (not times, throughput or memory)
EXACT = ("step", "loss", "lr", "grad_norm", "tokens", "skipped_steps", "spike_steps", "rollbacks", "rollback")


class Inject:
    """A forward hook on the final norm: the first forward of each step in `factors` scales the
    hidden states by its factor (a large one: a loss spike; NaN: a non-finite loss)."""

    def __init__(self, trainer, factors: dict):
        self.trainer, self.factors, self.done = trainer, factors, set()

    def __call__(self, module, inputs, output):
        step = self.trainer.step
        if step in self.factors and step not in self.done:
            self.done.add(step)
            return output * self.factors[step]
        return output


def fit(cfg, factors=None, stop_after=None):
    trainer = build(cfg, Mesh(ParallelConfig(), "cpu"))
    if stop_after is not None:
        stop_at(trainer, stop_after)
    if factors:
        trainer.model.norm.register_forward_hook(Inject(trainer, factors))
    try:
        trainer.rows = trainer.fit()
    finally:
        trainer.loader.close()
    return trainer


def untimed(rows):
    return [{k: r[k] for k in EXACT if k in r} for r in rows]


@pytest.mark.parametrize("setting, value", [("spike_zscore", -1.0), ("spike_window", 1), ("hang_timeout", -5.0),
                                            ("max_hours", math.nan), ("max_hours", math.inf)])
def test_bad_fault_settings_are_named(setting, value):
    with pytest.raises(ValueError, match=f"train.{setting}"):
        TrainConfig(**{setting: value})


def test_spike_window_and_threshold():
    faults = Faults(TrainConfig(spike_zscore=3.0, spike_window=5), is_main=True)
    for loss in (2.0, 2.1, 1.9, 2.0):
        assert not faults.skip(loss, 1.0)
    assert not faults.skip(100.0, 1.0)  # 4 losses: the check needs min(window, 20) = 5
    assert list(faults.losses) == [2.0, 2.1, 1.9, 2.0, 100.0]
    faults.load_state_dict({"spike_losses": [2.0, 2.1, 1.9, 2.0, 2.05]})
    mean, std = 2.01, math.sqrt(sum((x - 2.01) ** 2 for x in (2.0, 2.1, 1.9, 2.0, 2.05)) / 4)
    assert not faults.skip(mean + 2.9 * std, 1.0)  # accepted: joins the window, the oldest leaves
    assert len(faults.losses) == 5 and faults.losses[0] == 2.1
    assert faults.skip(3.0, 1.0) and faults._spike
    assert "loss spike: loss 3.0000" in faults._reason and "z = " in faults._reason
    assert faults.skip(math.nan, 1.0) and not faults._spike and faults.skip(2.0, math.inf)
    off = Faults(TrainConfig(spike_zscore=0.0, spike_window=2), is_main=True)
    assert not any(off.skip(x, 1.0) for x in (1.0, 1.0, 1e6))


def test_loss_spike_is_skipped_counted_and_resumed_exactly(data_cfg, tmp_path, caplog):
    """A resumed run restores the spike window: after a resume at step 4 an empty window (it needs
    4 losses) would let the spike of step 6 through."""
    settings = dict(max_steps=8, spike_window=4, spike_zscore=6.0)
    whole = make_cfg(data_cfg, tmp_path / "whole", **settings)
    with caplog.at_level(logging.WARNING, "train"):
        fit(whole, {6: 50.0})
    assert "step 6 skipped: loss spike: loss " in caplog.text and "mean " in caplog.text and "z = " in caplog.text
    rows = metrics(whole.train.run_dir)
    assert [r["spike_steps"] for r in rows] == [0] * 5 + [1] * 3
    assert [r["skipped_steps"] for r in rows] == [0] * 5 + [1] * 3
    assert rows[5]["loss"] > 3 * rows[4]["loss"] and rows[6]["loss"] < 1.2 * rows[4]["loss"]
    parts = make_cfg(data_cfg, tmp_path / "parts", **settings)
    fit(parts, stop_after=4)
    assert state_of(latest_checkpoint(parts.train.run_dir))["faults"]["spike_losses"] == [r["loss"] for r in rows[:4]]
    fit(parts, {6: 50.0})
    assert untimed(metrics(parts.train.run_dir)) == untimed(rows)
    end_whole, end_parts = (state_of(latest_checkpoint(c.train.run_dir)) for c in (whole, parts))
    assert end_parts["faults"] == end_whole["faults"]
    assert end_whole["faults"]["spike_losses"] == [r["loss"] for r in rows if r["step"] != 6][-4:]


def test_rollback_moves_past_the_bad_batches_once(data_cfg, tmp_path, caplog):
    cfg = make_cfg(data_cfg, tmp_path, max_steps=8, save_every=4, max_skipped_steps=1, spike_window=4)
    with caplog.at_level(logging.WARNING, "train"):
        trainer = fit(cfg, {6: 50.0, 7: 50.0})  # two spikes in a row: one more than tolerated
    assert "rolling back from step 7 to the checkpoint of step 4" in caplog.text
    assert "the 3 batches of steps 5-7 are not trained on" in caplog.text
    rows = metrics(cfg.train.run_dir)
    assert [r["step"] for r in rows] == list(range(1, 9))  # the rows of steps 5 and 6 were rewritten
    assert untimed(trainer.rows) == untimed(rows)
    assert rows[4]["rollback"] == {"from_step": 7, "to_step": 4, "skipped_batches": 3}
    assert [r["rollbacks"] for r in rows] == [0] * 4 + [1] * 4 and "rollback" not in rows[5]
    assert rows[-1]["skipped_steps"] == rows[-1]["spike_steps"] == 2  # totals kept over the rollback
    state = state_of(latest_checkpoint(cfg.train.run_dir))
    assert state["step"] == 8 and state["tokens_seen"] == 8 * 4 * 64
    assert [(r["from_step"], r["to_step"]) for r in state["faults"]["rollbacks"]] == [(7, 4)]
    # the loader went on: 8 steps trained, 11 batches read
    reference = build_loader(cfg.data, seed=cfg.train.seed, global_batch=4, dp_rank=0, dp_size=1)
    for _ in range(11):
        reference.next_batch()
    assert state["loader"] == reference.state_dict() == trainer.loader.state_dict()
    reference.close()

    longer = make_cfg(data_cfg, tmp_path, max_steps=12, save_every=4, max_skipped_steps=1, spike_window=4)
    nan = float("nan")
    with pytest.raises(TrainingError, match=r"already rolled back once \(from step 7 to step 4\).*"
                                            r"train.max_skipped_steps=1"):
        fit(longer, {10: nan, 11: nan})  # the count came back from state.json


def test_no_checkpoint_to_roll_back_to_is_an_error(data_cfg, tmp_path):
    cfg = make_cfg(data_cfg, tmp_path, max_steps=6, max_skipped_steps=1)
    with pytest.raises(TrainingError, match="no checkpoint in .* to roll back to.*train.save_every"):
        fit(cfg, {2: float("nan"), 3: float("nan")})


def first_due(limit: TimeLimit, now: float, step_s: float) -> float:
    """Steps of `step_s` seconds from `now` on: the time of the first step after which `limit` stops."""
    while not limit.due(None, None, now=now):
        now += step_s
    return now


def test_time_limit_estimate():
    """Started at 0 with a one-hour limit; the first step (compilation) takes 300 s, then 10 s each."""
    limit = TimeLimit(max_hours=1.0, started=0.0)
    limit.start(now=100.0)
    assert not limit.due(None, None, now=400.0)
    # no save measured yet: one more step and the save are estimated as 10 s each (not 300 s)
    assert first_due(limit, 410.0, 10.0) == 3590.0  # 3580 + 10 + 10 is not past 3600
    limit = TimeLimit(max_hours=1.0, started=0.0)
    limit.start(now=0.0)
    limit.due(None, None, now=300.0)
    limit.due(2.0, 50.0, now=310.0)  # a save: 2 s staging, 50 s writing
    assert first_due(limit, 320.0, 10.0) == 3540.0  # 3540 + 10 + 52 > 3600
    assert not TimeLimit(max_hours=0.0, started=0.0).due(None, None, now=1e9)


def test_max_hours_saves_stops_and_resumes_exactly(data_cfg, tmp_path, caplog):
    whole = make_cfg(data_cfg, tmp_path / "whole", max_steps=4)
    fit(whole)
    parts = make_cfg(data_cfg, tmp_path / "parts", max_steps=4, max_hours=1e-6)  # already past: stop after step 1
    with caplog.at_level(logging.INFO, "train"):
        first = fit(parts)
    assert first.step == 1 and first.stop_reason == "train.max_hours=1e-06 reached"
    assert "train.max_hours=1e-06 reached: saved a checkpoint at step 1 and stopping" in caplog.text
    assert state_of(latest_checkpoint(parts.train.run_dir))["step"] == 1
    fit(make_cfg(data_cfg, tmp_path / "parts", max_steps=4))
    assert [r["loss"] for r in metrics(parts.train.run_dir)] == [r["loss"] for r in metrics(whole.train.run_dir)]


def worker(*args, env: dict, ranks: int = 0, restarts: int = 0, tmp_path, timeout=240):
    """faults_worker.py with `args` (in one process, or under torchrun on `ranks` ranks)."""
    cmd = [sys.executable]
    if ranks:
        cmd += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                "--max-restarts", str(restarts)]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", SPIKINGBRAIN_CACHE=str(tmp_path / "cache"),
                    OMP_NUM_THREADS="1", **env)
    return subprocess.run(cmd + [WORKER, *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=tmp_path)


def test_hung_ranks_dump_their_stacks_and_exit(tmp_path):
    """Rank 1 sleeps in step 2; rank 0 waits for it in a collective. Each rank's watchdog fires
    (rank 1's later: its own timeout), writes its threads' stacks and exits with HANG_EXIT_CODE."""
    run_dir = tmp_path / "run"
    r = worker(*small_run(tmp_path, "train.hang_timeout=2", "train.eval_every=0"), ranks=2,
               env={"FAULTS_HANG": "1:2:4"}, tmp_path=tmp_path)
    assert r.returncode != 0
    assert r.stderr.count(f"exitcode  : {HANG_EXIT_CODE}") == 2, r.stderr[-3000:]
    sleeper = open(hang_file(str(run_dir), 1)).read()
    assert "hang on rank 1 (host " in sleeper and "no progress for 4 s at step 2 (training;" in sleeper
    assert "in hang_in_train_step" in sleeper and f"rank 1 exits with code {HANG_EXIT_CODE}" in sleeper
    waiter = open(hang_file(str(run_dir), 0)).read()
    assert "no progress for 2 s at step 2" in waiter and "in all_reduce" in waiter and "in train_step" in waiter
    assert "hang on rank 0" in r.stderr and "hang on rank 1" in r.stderr  # the same dumps on stderr


def test_killed_rank_restarts_resumes_and_finishes(tmp_path):
    """Two ranks under torchrun --max-restarts 1: a NaN streak rolls back (step 4 -> 2), then rank 1
    is SIGKILLed after step 5 in the first attempt; the group restarts, resumes from `latest`
    (step 4) and finishes. The rows match a one-process run with the same NaN steps (rel 1e-5:
    two ranks sum the loss in another order)."""
    args = ("train.max_steps=8", "train.save_every=2", "train.max_skipped_steps=1", "train.eval_every=0")
    nan = {"FAULTS_NAN_STEPS": "3,4"}
    one = worker(*small_run(tmp_path / "one", *args), env=nan, tmp_path=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    # as the README says for --max-restarts: without it torchrun's c10d rendezvous hands the
    # restarted group the TCPStore of the first attempt, whose stale addresses fail or hang init
    two = worker(*small_run(tmp_path / "two", *args), ranks=2, restarts=1, tmp_path=tmp_path,
                 env={**nan, "FAULTS_KILL": "1:5", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    assert "exitcode: -9" in two.stderr and "local_rank: 1" in two.stderr  # the kill happened
    assert "rolling back from step 4 to the checkpoint of step 2" in two.stdout
    assert "resumed from" in two.stdout and "at step 4 (saved by 2 rank(s), now 2)" in two.stdout
    a, b = metrics(tmp_path / "one" / "run"), metrics(tmp_path / "two" / "run")
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, 9))
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    assert b[2]["rollback"] == a[2]["rollback"] == {"from_step": 4, "to_step": 2, "skipped_batches": 2}
    end = state_of(latest_checkpoint(str(tmp_path / "two" / "run")))
    assert end["step"] == 8 and end["dp"] == 2 and len(end["faults"]["rollbacks"]) == 1
    assert json.dumps(end["loader"]) == json.dumps(state_of(latest_checkpoint(str(tmp_path / "one" / "run")))["loader"])
