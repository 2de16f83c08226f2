"""Faults of long runs: skipped steps (non-finite values, loss spikes), the rollback to the last
checkpoint after too many of them in a row, and the scheduler's time limit (`train.max_hours`).

- **Skipped steps.** A step whose global loss or gradient norm is NaN/Inf, or whose loss is a
  spike, gets no optimizer update. A spike is a loss above `mean + train.spike_zscore * std` of
  the losses of the last `train.spike_window` accepted steps; the check starts once the window
  holds `min(train.spike_window, 20)` losses. Loss and gradient norm are all-reduced, so every
  rank decides the same.
- **Rollback.** More than `train.max_skipped_steps` skipped steps in a row reload the run's
  `latest` checkpoint (weights, optimizer, RNG, step, tokens, spike window and logging window of
  that step) but keep the data loader where it is, so training moves past the batches that
  caused them; the step counter and the schedule continue from the checkpoint's step, while the
  counts of skipped steps and spikes keep their totals. The second time (counted in state.json,
  also across resumes), or without a checkpoint to go back to, the run stops with a
  TrainingError.
- **Time limit.** With `train.max_hours`, the run saves and stops (exit code 0) after the step
  at which the time since the process started plus one more step and a save (the longest
  measured in this process) would pass the limit.

All of it is saved in the checkpoint's state.json (`faults`) and restored at resume, so a resumed
run decides exactly as an uninterrupted one.
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections import deque

from parallel import comm
from .checkpoint import latest_checkpoint, read_state
from .errors import TrainingError

log = logging.getLogger("train")

MIN_SPIKE_WINDOW = 20  # losses the spike check needs (fewer with a shorter train.spike_window)
RECENT_STEPS = 20      # step times the time limit's estimate looks at


class Faults:
    """The skip decision of each step and what follows a run of skipped steps, for one trainer.
    t: TrainConfig."""

    def __init__(self, t, is_main: bool):
        self.zscore, self.window, self.limit = t.spike_zscore, t.spike_window, t.max_skipped_steps
        self.is_main = is_main
        self.losses: deque[float] = deque(maxlen=t.spike_window)  # of the last accepted steps
        self.spike_steps = 0        # in the whole run
        self.in_a_row = 0           # skipped steps in a row, up to the current one
        self.rollbacks: list[dict] = []  # {"from_step", "to_step", "skipped_batches", "time"}
        self._reason: str | None = None  # why the current step was skipped
        self._spike = False
        self._pending: dict | None = None  # the rollback the next metrics row reports

    def state_dict(self) -> dict:
        return {"spike_losses": list(self.losses), "spike_steps": self.spike_steps,
                "skipped_in_a_row": self.in_a_row, "rollbacks": [dict(r) for r in self.rollbacks]}

    def load_state_dict(self, state: dict | None) -> None:
        """The state of `state_dict()` (None or {}: a checkpoint written before it, a fresh state)."""
        state = state or {}
        self.losses.clear()
        self.losses.extend(float(x) for x in state.get("spike_losses", []))
        self.spike_steps = int(state.get("spike_steps", 0))
        self.in_a_row = int(state.get("skipped_in_a_row", 0))
        self.rollbacks = [dict(r) for r in state.get("rollbacks", [])]

    def skip(self, loss: float, grad_norm: float) -> bool:
        """Whether the step with global `loss` and `grad_norm` (the same on every rank) skips its
        update; an accepted step's loss joins the spike window."""
        self._spike = False
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self._reason = f"non-finite loss {loss} or gradient norm {grad_norm}"
            return True
        spike = self._spike_stats(loss)
        if spike is not None:
            mean, std, z = spike
            self._reason = (f"loss spike: loss {loss:.4f}, mean {mean:.4f} and std {std:.4f} of the last "
                            f"{len(self.losses)} accepted steps, z = {z:.1f} > train.spike_zscore={self.zscore:g}")
            self._spike = True
            return True
        self._reason = None
        self.losses.append(loss)
        return False

    def _spike_stats(self, loss: float) -> tuple[float, float, float] | None:
        """(mean, std, z) of `loss` against the window when it is a spike, else None."""
        n = len(self.losses)
        if not self.zscore or n < min(self.window, MIN_SPIKE_WINDOW):
            return None
        mean = math.fsum(self.losses) / n
        std = math.sqrt(math.fsum((x - mean) ** 2 for x in self.losses) / (n - 1))
        if loss <= mean + self.zscore * std:
            return None
        return mean, std, (loss - mean) / std if std > 0 else math.inf

    def count(self, trainer, skipped: bool) -> bool:
        """Counts the step `skip` judged; True when the run rolled back to its last checkpoint
        (the trainer's step is then that checkpoint's). Raises TrainingError when it cannot."""
        if not skipped:
            self.in_a_row = 0
            return False
        trainer.skipped_steps += 1
        self.in_a_row += 1
        self.spike_steps += int(self._spike)
        if self.is_main:
            log.warning("step %d skipped: %s (%d in a row, %d in all, %d loss spikes)", trainer.step,
                        self._reason, self.in_a_row, trainer.skipped_steps, self.spike_steps)
        if self.in_a_row <= self.limit:
            return False
        roll_back(trainer)
        return True

    def row(self) -> dict:
        """The fault counts for a metrics row, and once after a rollback its record."""
        out = {"spike_steps": self.spike_steps, "rollbacks": len(self.rollbacks)}
        if self._pending is not None:
            out["rollback"], self._pending = self._pending, None
        return out


def roll_back(trainer) -> None:
    """Reloads the run's `latest` checkpoint into `trainer`, keeping its data loader where it is
    (every rank calls this at the same step: the skip decision is the same on every rank)."""
    faults, t, mesh = trainer.faults, trainer.cfg.train, trainer.mesh
    step, bad = trainer.step, faults.in_a_row
    what = (f"{bad} steps in a row were skipped up to step {step} (non-finite loss or gradient norm, or "
            f"loss spikes), more than train.max_skipped_steps={t.max_skipped_steps}")
    advice = f"lower train.lr, resume from an earlier checkpoint or raise train.max_skipped_steps={t.max_skipped_steps}"
    if faults.rollbacks:
        last = faults.rollbacks[-1]
        raise TrainingError(f"{what}, after the run already rolled back once (from step {last['from_step']} "
                            f"to step {last['to_step']}); the run has diverged: {advice}")
    trainer.checkpointer.wait()  # the write in flight may be the newest checkpoint
    # rank 0 decides for every rank: `latest` is committed by rank 0 after the others' writes
    target = _rollback_target(t.run_dir, step) if mesh.is_main else None
    path, to_step, why = comm.broadcast_object(target, trainer.checkpointer.group)
    if why:
        raise TrainingError(f"{what}, and {why}; the run has diverged: {advice} (with train.save_every "
                            f"the run rolls back once to its last checkpoint)")
    if mesh.is_main:
        log.warning("%s: rolling back from step %d to the checkpoint of step %d (%s); the data loader "
                    "stays where it is, so the %d batches of steps %d-%d are not trained on. A second "
                    "time stops the run", what, step, to_step, path, step - to_step, to_step + 1, step)
    trainer.watchdog.beat(step, "rollback", long=True)  # reading a checkpoint, like a start
    records, skipped, spikes = faults.rollbacks, trainer.skipped_steps, faults.spike_steps
    trainer.resume(path, keep_loader=True)  # step, tokens, spike window and logging window of the checkpoint
    # the counts of skipped steps and spikes are the run's events: they keep their totals
    trainer.skipped_steps, faults.spike_steps, faults.in_a_row = skipped, spikes, 0
    record = {"from_step": step, "to_step": trainer.step, "skipped_batches": step - trainer.step,
              "time": time.time()}
    faults.rollbacks = records + [record]
    faults._pending = {k: v for k, v in record.items() if k != "time"}


def _rollback_target(run_dir: str, step: int) -> tuple[str | None, int | None, str | None]:
    """(the checkpoint to roll back to, its step, None), or (None, None, why there is none)."""
    path = latest_checkpoint(run_dir)
    if path is None:
        return None, None, f"there is no checkpoint in {run_dir} to roll back to"
    try:
        saved = int(read_state(path)["step"])
    except (ValueError, KeyError, TypeError) as e:
        return None, None, f"the newest checkpoint cannot be read ({e})"
    if saved >= step:
        return None, None, f"the newest checkpoint ({path}, step {saved}) is not older than step {step}"
    return path, saved, None


class TimeLimit:
    """`train.max_hours`: whether the run should save and stop now, so that it ends before the
    limit. Measured from the process's start; the next step and the save are estimated by the
    longest of the recent steps and of the saves of this process (before the first save: by the
    longest step)."""

    def __init__(self, max_hours: float, started: float | None = None):
        """started: time.monotonic() at the process's start (default: read from the system)."""
        self.limit_s = max_hours * 3600.0
        self.started = process_start() if started is None else started
        self.steps: deque[float] = deque(maxlen=RECENT_STEPS)  # the first step of the process is not among them
        self.first_step: float | None = None
        self.longest_stall = self.longest_write = 0.0
        self._last: float | None = None

    def due(self, stall_s: float | None, write_s: float | None, now: float | None = None) -> bool:
        """Called once per step, at its end: records the step's time and the latest save's times
        (stall_s: staging, training waits; write_s: the write of the files; None: no save yet)
        and says whether one more step and a save would pass the limit."""
        now = time.monotonic() if now is None else now
        if self._last is not None:
            if self.first_step is None:
                self.first_step = now - self._last
            else:
                self.steps.append(now - self._last)
        self._last = now
        self.longest_stall = max(self.longest_stall, stall_s or 0.0)
        self.longest_write = max(self.longest_write, write_s or 0.0)
        if not self.limit_s or self.first_step is None:
            return False
        step = max(self.steps) if self.steps else self.first_step
        save = self.longest_stall + self.longest_write if self.longest_write else step
        return now - self.started + step + save > self.limit_s

    def start(self, now: float | None = None) -> None:
        """Marks the start of the first step of `fit`."""
        self._last = time.monotonic() if now is None else now

    def reason(self) -> str:
        return f"train.max_hours={self.limit_s / 3600:g} reached"


_IMPORTED = time.monotonic()


def process_start() -> float:
    """time.monotonic() at this process's start, from /proc on Linux (the time of this module's
    import where that is unavailable or inconsistent)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _IMPORTED
    now = time.monotonic()
    # a container's /proc/uptime may count from another boot than the process's start time
    return now - age if age >= now - _IMPORTED else _IMPORTED
