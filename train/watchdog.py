"""Hang watchdog (`train.hang_timeout`): a rank that makes no progress for that long dumps the
Python stacks of all its threads and exits with a non-zero code, so that `torchrun` restarts the
group (or the scheduler sees a failed job) instead of the run idling on hundreds of GPUs.

The trainer arms it at the start of every step (the step's forward, backward, collectives,
logging, validation, checkpoint staging and the wait for the previous write) and before the
final checkpoint write. The first step of a trainer gets `FIRST_STEP_FACTOR` times the timeout:
it compiles and autotunes kernels, which can take many minutes; so do a rollback, which reads a
checkpoint, and the final checkpoint write, which training does not overlap.

When the deadline passes, a daemon thread writes a header (time, rank, host, pid, step) and every
thread's stack (`faulthandler.dump_traceback`) to stderr and appends them to
`run_dir/hangs/rank_<R>.txt`, then ends the process with exit code `HANG_EXIT_CODE` (no clean-up:
the main thread is stuck). Should that thread not run (the main thread holding the interpreter
lock in C code), `faulthandler.dump_traceback_later` fires `BACKSTOP_S` later from C: it dumps
the stacks to stderr and exits with code 1. (`faulthandler` has one such timer per process: while
a trainer's `fit` runs, the watchdog owns it.)
"""
from __future__ import annotations

import contextlib
import faulthandler
import math
import os
import socket
import threading
import time

HANG_EXIT_CODE = 124
FIRST_STEP_FACTOR = 4
BACKSTOP_S = 60.0
STDERR = 2  # the file descriptor (sys.stderr may be replaced by an object without one)


def hang_file(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, "hangs", f"rank_{rank}.txt")


class Watchdog:
    """Exits the process when `beat` is not called again within the allowance (`timeout`
    seconds; 0 disables). One per trainer: `start`, `beat` at every step, `stop`."""

    def __init__(self, timeout: float, run_dir: str, rank: int):
        self.timeout, self.run_dir, self.rank = timeout, run_dir, rank
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._deadline = math.inf  # time.monotonic() by which the next beat must come; -1: stopped
        self._where = ("start", 0, 0.0)  # (what, step, allowance) of the last beat
        self._first = True

    def start(self) -> None:
        """Starts watching (armed by the first `beat`); nothing when disabled."""
        if self.timeout <= 0 or self._thread is not None:
            return
        self._deadline, self._first = math.inf, True
        self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
        self._thread.start()

    def beat(self, step: int, what: str = "training", long: bool = False) -> None:
        """Progress: `what` at `step` starts and must end (or beat again) within the timeout
        (FIRST_STEP_FACTOR times it for the first beat after `start`, and with `long`)."""
        if self._thread is None:
            return
        allowance = self.timeout * (FIRST_STEP_FACTOR if long or self._first else 1)
        self._first = False
        with self._cond:
            self._deadline = time.monotonic() + allowance
            self._where = (what, step, allowance)
            self._cond.notify()
        faulthandler.dump_traceback_later(allowance + BACKSTOP_S, exit=True, file=STDERR)

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        faulthandler.cancel_dump_traceback_later()
        with self._cond:
            self._deadline = -1.0
            self._cond.notify()
        thread.join()

    def _watch(self) -> None:
        with self._cond:
            while True:
                if self._deadline < 0:
                    return
                left = self._deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(None if left == math.inf else left)
            what, step, allowance = self._where
        self._fire(what, step, allowance)

    def _fire(self, what: str, step: int, allowance: float) -> None:
        """Dumps every thread's stack to stderr and the rank's hang file, then exits. Writes
        with os.write only: the stuck thread may hold the locks of logging or sys.stderr."""
        header = (f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S %z')}: hang on rank {self.rank} "
                  f"(host {socket.gethostname()}, pid {os.getpid()}): no progress for {allowance:.0f} s "
                  f"at step {step} ({what}; train.hang_timeout={self.timeout:g}); stacks of all "
                  f"threads, most recent call first ===\n").encode()
        path = hang_file(self.run_dir, self.rank)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            fd = None
            _write(STDERR, f"hang watchdog: cannot write {path} ({e})\n".encode())
        for out in (STDERR, fd):
            if out is not None:
                _write(out, header)
                faulthandler.dump_traceback(file=out, all_threads=True)
                _write(out, f"=== rank {self.rank} exits with code {HANG_EXIT_CODE} ===\n".encode())
        if fd is not None:
            with contextlib.suppress(OSError):
                os.fsync(fd)
        os._exit(HANG_EXIT_CODE)


def _write(fd: int, data: bytes) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, data)
