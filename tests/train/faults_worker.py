"""Test-only launcher: `launch/pretrain.py` with faults injected into the trainer, for
tests/train/test_faults.py. Run as `python tests/train/faults_worker.py OVERRIDES...` or under
`torchrun`. The faults come from the environment:

- FAULTS_NAN_STEPS=3,4: the first time this process runs each of these steps, rank 0's loss sum
  is NaN (the whole global loss then is: the step is skipped on every rank).
- FAULTS_KILL=RANK:STEP: in the first attempt (TORCHELASTIC_RESTART_COUNT unset or 0), rank RANK
  kills itself with SIGKILL after the optimizer step of STEP (once its checkpoint writes are done).
- FAULTS_HANG=RANK:STEP[:TIMEOUT]: rank RANK sleeps in the train step of STEP far beyond
  train.hang_timeout (TIMEOUT: that rank's own train.hang_timeout, so ranks fire in a known order).
"""
import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from launch.pretrain import main  # noqa: E402
from train.trainer import Trainer  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))


def _rank_step(name: str) -> tuple[int, int, list[str]] | None:
    value = os.environ.get(name)
    if not value:
        return None
    rank, step, *rest = value.split(":")
    return int(rank), int(step), rest


def inject_nan(steps: set[int]) -> None:
    accumulate = Trainer._accumulate
    done: set[int] = set()

    def nan_loss_sum(self, *args, **kwargs):
        loss_sum = accumulate(self, *args, **kwargs)
        if self.step in steps and self.step not in done and RANK == 0:
            done.add(self.step)
            return loss_sum * float("nan")
        return loss_sum

    Trainer._accumulate = nan_loss_sum


def inject_kill(rank: int, step: int) -> None:
    train_step = Trainer.train_step

    def killing_train_step(self):
        out = train_step(self)
        if self.step == step and RANK == rank and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
            self.checkpointer.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    Trainer.train_step = killing_train_step


def inject_hang(rank: int, step: int) -> None:
    train_step = Trainer.train_step

    def hang_in_train_step(self):
        if self.step == step and RANK == rank:
            time.sleep(3600)
        return train_step(self)

    Trainer.train_step = hang_in_train_step


if __name__ == "__main__":
    torch.set_num_threads(1)
    argv = sys.argv[1:]
    if os.environ.get("FAULTS_NAN_STEPS"):
        inject_nan({int(s) for s in os.environ["FAULTS_NAN_STEPS"].split(",")})
    if (kill := _rank_step("FAULTS_KILL")) is not None:
        inject_kill(*kill[:2])
    if (hang := _rank_step("FAULTS_HANG")) is not None:
        inject_hang(*hang[:2])
        if hang[2] and RANK == hang[0]:
            argv.append(f"train.hang_timeout={hang[2][0]}")
    sys.exit(main(argv))
