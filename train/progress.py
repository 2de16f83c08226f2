"""The progress bar of a training run (`train.progress`): rank 0, on stderr, a terminal only by
default. It shows the recipe stage, step / max_steps, the tokens so far, the step rate and ETA
(tqdm's, from the steps of this process), and the latest step's loss. While it is shown, log
records of the root logger's console handlers are written through tqdm, so a log line never
lands in the middle of the bar."""
from __future__ import annotations

import contextlib
import sys

MODES = ("auto", "on", "off")


def shown(mode: str, is_main: bool, stream=None) -> bool:
    """Whether the bar is drawn: rank 0 only; `auto` only when `stream` (stderr) is a terminal."""
    if mode not in MODES:
        raise ValueError(f"train.progress must be one of {', '.join(MODES)}, got {mode!r}")
    stream = sys.stderr if stream is None else stream
    if not is_main or mode == "off":
        return False
    return mode == "on" or bool(getattr(stream, "isatty", lambda: False)())


class Progress:
    """`start`, `update` once per step, `close` (idempotent); does nothing when not `shown`."""

    def __init__(self, mode: str, is_main: bool, max_steps: int, stage: str = "", stream=None):
        self.stream = sys.stderr if stream is None else stream
        self.enabled = shown(mode, is_main, self.stream)
        self.max_steps, self.stage = max_steps, stage
        self.bar = None
        self._redirect = contextlib.ExitStack()

    def start(self, step: int) -> None:
        """Opens the bar at `step` (a resumed run starts part-way; its rate counts from here)."""
        if not self.enabled or self.bar is not None or step >= self.max_steps:
            return
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self.bar = tqdm(total=self.max_steps, initial=step, desc=self.stage or None, unit="step",
                        file=self.stream, dynamic_ncols=True, smoothing=0.05)
        self._redirect.enter_context(logging_redirect_tqdm(tqdm_class=tqdm))

    def update(self, step: int, tokens: int, loss: float) -> None:
        if self.bar is None:
            return
        self.bar.set_postfix_str(f"loss {loss:.4f}, tokens {_tokens(tokens)}", refresh=False)
        self.bar.update(step - self.bar.n)  # negative after a rollback to a checkpoint

    def close(self) -> None:
        if self.bar is None:
            return
        bar, self.bar = self.bar, None
        bar.close()
        self._redirect.close()


def _tokens(n: int) -> str:
    from tqdm import tqdm

    return tqdm.format_sizeof(n, divisor=1000).strip()
