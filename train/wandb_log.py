"""Weights & Biases logging of a run's metrics rows (`train.wandb`), rank 0 only.

`offline` (the default) writes the run under `run_dir/wandb/` and sends nothing (`wandb sync
run_dir/wandb/offline-run-*` uploads it later); `online` streams to the server; `disabled`
never imports wandb. `WANDB_MODE=disabled` in the environment also turns it off, whatever
`train.wandb` says (the test suite sets it). The run id is kept in `run_dir/wandb/run_id`: a
resumed run continues the same wandb run (resume="allow"), a fresh start (a new run directory,
train.overwrite) begins a new one. Each metrics row is logged at its step, numbers only:
`expert_load` as each MoE layer's busiest expert over the mean (`expert_load/layer_N`),
dictionaries flattened to `key/name`. Logging must never stop training: a failing import, init
or log warns once and turns wandb off for the rest of the run.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import string

from .manifest import write_file

log = logging.getLogger("train")

MODES = ("offline", "online", "disabled")
RUN_ID = "run_id"


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"train.wandb must be one of {', '.join(MODES)}, got {mode!r}")


def numbers(row: dict, moe_layers: list[int] | None = None) -> dict:
    """The numeric fields of a metrics row for wandb: nested dicts flattened to `key/name`,
    `expert_load` [MoE layer][expert] shares as the busiest expert over the mean per layer
    (`expert_load/layer_N`, N the decoder layer from `moe_layers`), lists of dicts (per layer)
    as `key/layer_N/name`; strings and other values left out."""
    out = {}
    for key, value in row.items():
        if key == "step":
            continue
        if key == "expert_load" and isinstance(value, list):
            layers = moe_layers if moe_layers and len(moe_layers) == len(value) else range(len(value))
            for layer, shares in zip(layers, value):
                if shares:
                    out[f"expert_load/layer_{layer}"] = max(shares) * len(shares)
        elif isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in value.items() if _is_number(v)})
        elif isinstance(value, list):
            for i, entry in enumerate(value):
                if isinstance(entry, dict):
                    out.update({f"{key}/layer_{i}/{k}": v for k, v in entry.items() if _is_number(v)})
        elif _is_number(value):
            out[key] = value
    return out


def _has_credentials(wandb) -> bool:
    """Whether an API key is configured, asking nobody: without one, `wandb.init` online waits
    for an answer at a login prompt when it runs in a terminal."""
    try:
        return bool(wandb.login(prompt=False, verify=False))
    except TypeError:  # a wandb whose login() cannot be told not to prompt
        return bool(os.environ.get("WANDB_API_KEY"))


def new_id() -> str:
    """A fresh run id in wandb's form: 8 lowercase letters and digits."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class WandbLogger:
    """`start(resumed)` at the beginning of `Trainer.fit`, `log(row)` per metrics row,
    `finish(failed)` at its end (idempotent)."""

    def __init__(self, cfg, is_main: bool):
        t = cfg.train
        check_mode(t.wandb)
        self.cfg = cfg
        self.mode = t.wandb if is_main and os.environ.get("WANDB_MODE") != "disabled" else "disabled"
        self.dir = os.path.join(t.run_dir, "wandb")
        self.run = None
        self.last_step: int | None = None
        self.moe_layers = [i for i, ffn in enumerate(cfg.model.ffns) if ffn == "moe"]

    @property
    def id_path(self) -> str:
        return os.path.join(self.dir, RUN_ID)

    def start(self, resumed: bool) -> None:
        """Starts (or, resumed with a stored id, continues) the wandb run."""
        if self.mode == "disabled" or self.run is not None:
            return
        try:
            import wandb

            if self.mode == "online" and not _has_credentials(wandb):
                raise RuntimeError("no W&B API key (run `wandb login` or set WANDB_API_KEY); "
                                   "train.wandb=offline keeps the run in run_dir/wandb to upload later")
            run_id = self._stored_id() if resumed else None
            t = self.cfg.train
            os.makedirs(self.dir, exist_ok=True)
            self.run = wandb.init(
                project=t.wandb_project, name=t.wandb_name or os.path.basename(os.path.abspath(t.run_dir)),
                id=run_id or new_id(), resume="allow", dir=os.path.abspath(t.run_dir),
                mode=self.mode, config=dataclasses.asdict(self.cfg),
                settings=wandb.Settings(silent=True, console="off"))
            write_file(self.id_path, self.run.id.encode(), atomic=True)
        except Exception as e:  # noqa: BLE001 (any failure of wandb: train on without it)
            self._give_up("start", e)
            return
        folder = os.path.dirname(self.run.dir)
        log.info("wandb %s run %s in %s%s", self.mode, self.run.id, folder,
                 f" (upload it with: wandb sync {folder})" if self.mode == "offline" else "")

    def _stored_id(self) -> str | None:
        try:
            with open(self.id_path) as f:
                return f.read().strip() or None
        except FileNotFoundError:
            return None

    def log(self, row: dict) -> None:
        """Logs `row` at its step. A step not after the last one logged here (a rollback to an
        earlier checkpoint) is left out: wandb keeps a step's first values."""
        if self.run is None or (self.last_step is not None and row["step"] <= self.last_step):
            return
        try:
            self.run.log(numbers(row, self.moe_layers), step=row["step"])
            self.last_step = row["step"]
        except Exception as e:  # noqa: BLE001
            self._give_up("log", e)

    def finish(self, failed: bool = False) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        try:
            run.finish(exit_code=1 if failed else 0)
        except Exception as e:  # noqa: BLE001
            log.warning("wandb: finishing the run failed (%s: %s)", type(e).__name__, e)

    def _give_up(self, what: str, error: Exception) -> None:
        log.warning("wandb: %s failed (%s: %s); training continues without wandb (train.wandb=%s)",
                    what, type(error).__name__, error, self.mode)
        self.mode = "disabled"
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001 (already reported)
                pass
