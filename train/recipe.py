"""Multi-stage recipes: one command runs the stages of a continual-pretraining recipe in order.

    python launch/pretrain.py +model=sb7b recipe=cpt-150b train.init_from=CONVERTED train.run_dir=runs/cpt

A recipe (`conf/recipe/NAME.yaml`, a top-level `recipe:` section with `stages:`) lists stages,
each with a name, the tokens it trains on, its warm-up as a fraction of its steps, the settings it
changes (`set`: Hydra overrides such as `data.seq_len: 32768` or `parallel: sb7b-32k`) and settings
by model name (`by_model`). Every stage is an ordinary training run in its own directory
`RUN_DIR/stages/NN-NAME` (checkpoints, metrics.jsonl, config.yaml, eval/), so resuming, pruning and
the tools work on a stage as on any run:

- stage 1 starts from `train.init_from` (a converted checkpoint) or from scratch; stage k > 1
  starts from stage k-1's final weights (`train.init_from` = its final checkpoint, model only:
  the optimizer and the learning-rate schedule start afresh, warm-up and decay relative to the
  stage) and continues its data stream and token count (`train.data_from`), whatever the change
  of sequence length, batch or parallel layout;
- a stage's steps are its tokens over its tokens per step (`train.global_batch x data.seq_len`),
  rounded up;
- settings compose in this order: conf/ defaults, the recipe's `set`, then `by_model[model.name]`,
  then the command line, which wins (a stage setting also given on the command line is dropped
  for every stage). `train.max_steps` comes from the stage's tokens and may not be given;
- the runner can be stopped anywhere (SIGTERM/SIGUSR1, `train.max_hours`, a crash) and started
  again with the same command: finished stages (their newest checkpoint at their last step) are
  skipped, the stage in progress resumes from its newest checkpoint, the next one starts from it;
- `RUN_DIR/recipe.json` says which stage is running, finished or pending, and where each stage's
  final checkpoint is; `RUN_DIR/current` links to the running stage's directory;
- at the end of each stage, with `recipe.eval` on, rank 0 runs the long-context evaluation
  (`analysis.long_context`: loss by position up to the stage's sequence length, passkey retrieval
  at it) on the final checkpoint into `STAGE_DIR/eval/step_NNNNNNNN.json`, which
  `launch/report.py RUN_DIR` draws with the stages' metrics.

Under torchrun the default process group is joined once and kept for all stages (each stage
builds its own mesh and groups on it).
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from parallel.mesh import init_world, pick_device, world_backend
from .checkpoint import latest_checkpoint, read_state
from .config import RunConfig, from_dict
from .manifest import write_file

log = logging.getLogger("train")

RECIPE_FILE = "recipe.json"
STAGES_DIR = "stages"
CURRENT_LINK = "current"
# settings the runner sets for every stage; the command line may not
RUNNER_SET = ("train.max_steps", "train.stage", "train.data_from")


@dataclass
class StageSpec:
    """One stage: `tokens` to train on, `warmup` as a fraction of its steps (used unless
    train.warmup_steps is set by the stage or the command line), `set` {setting: value} and
    `by_model` {model name: {setting: value}} overrides (Hydra keys: `data.seq_len`, `parallel`)."""

    name: str
    tokens: float
    warmup: float = 0.01
    set: dict = field(default_factory=dict)
    by_model: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ValueError(f"recipe stage name {self.name!r}: use letters, digits, '-', '_' or '.'")
        if not self.tokens > 0:
            raise ValueError(f"recipe stage {self.name}: tokens must be > 0, got {self.tokens}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"recipe stage {self.name}: warmup is a fraction of the stage's steps in [0, 1), "
                             f"got {self.warmup}")
        for key in self.set:
            _check_key(key, f"recipe stage {self.name}: set")
        for model, values in self.by_model.items():
            if not isinstance(values, dict):
                raise ValueError(f"recipe stage {self.name}: by_model.{model} must be a mapping of settings")
            for key in values:
                _check_key(key, f"recipe stage {self.name}: by_model.{model}")

    def overrides(self, model: str) -> dict:
        return {**self.set, **self.by_model.get(model, {})}


@dataclass
class RecipeConfig:
    """`recipe:` of a recipe config. eval: the long-context evaluation at the end of each stage,
    over `eval_samples` sequences of the stage's length and `passkey_trials` passkey prompts."""

    name: str
    stages: list
    eval: bool = True
    eval_samples: int = 4
    passkey_trials: int = 5

    def __post_init__(self):
        if not self.stages:
            raise ValueError(f"recipe {self.name}: no stages")
        self.stages = [s if isinstance(s, StageSpec) else from_dict(StageSpec, s, f"recipe.stages[{i}]")
                       for i, s in enumerate(self.stages)]
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"recipe {self.name}: stage names must differ, got {names}")
        if self.eval_samples < 1 or self.passkey_trials < 0:
            raise ValueError(f"recipe {self.name}: eval_samples must be >= 1 and passkey_trials >= 0")


def _check_key(key, where: str) -> None:
    if not isinstance(key, str) or not key or key.startswith(("+", "~")):
        raise ValueError(f"{where}: {key!r} is not a setting name (e.g. data.seq_len or parallel)")
    if key in RUNNER_SET or key == "train.run_dir":
        raise ValueError(f"{where}: {key} is set by the recipe runner for every stage")


def override_key(override: str) -> str:
    """The setting an override sets: `+model=sb7b` -> model, `train.lr=1e-4` -> train.lr."""
    return override.lstrip("+~").partition("=")[0]


def format_value(value) -> str:
    """A YAML value as the right-hand side of a Hydra override."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def stage_dir(run_dir: str, index: int, spec: StageSpec) -> str:
    return os.path.join(run_dir, STAGES_DIR, f"{index + 1:02d}-{spec.name}")


@dataclass
class Stage:
    """A stage resolved for this command line: its spec, directory, config and step count."""

    index: int
    spec: StageSpec
    dir: str
    cfg: RunConfig
    overrides: list


def plan_stages(recipe: RecipeConfig, cli: list[str], compose, model: str, run_dir: str) -> list[Stage]:
    """Every stage's RunConfig: compose(overrides) -> RunConfig for the stage's overrides then the
    command line `cli` (which wins), with the runner's own settings. Bad settings of any stage
    are found here, before the first stage trains."""
    given = {override_key(o) for o in cli}
    for key in RUNNER_SET:
        if key in given:
            what = "the stage's tokens set its steps" if key == "train.max_steps" else "the runner sets it"
            raise ValueError(f"{key} cannot be given with a recipe ({what}); change recipe "
                             f"{recipe.name}'s stages instead")
    stages = []
    for i, spec in enumerate(recipe.stages):
        own = [f"{k}={format_value(v)}" for k, v in spec.overrides(model).items() if k not in given]
        overrides = own + list(cli)
        try:
            cfg = compose(overrides)
        except ValueError as e:
            raise ValueError(f"recipe {recipe.name}, stage {spec.name}: {e}") from None
        t = cfg.train
        steps = math.ceil(spec.tokens / (t.global_batch * cfg.data.seq_len))
        warmup = t.warmup_steps if "train.warmup_steps" in given | set(spec.overrides(model)) \
            else round(spec.warmup * steps)
        folder = stage_dir(run_dir, i, spec)
        train = dataclasses.replace(t, max_steps=steps, warmup_steps=warmup, run_dir=folder, stage=spec.name,
                                    overwrite=False, init_from=t.init_from if i == 0 else "",
                                    data_from="")
        stages.append(Stage(i, spec, folder, dataclasses.replace(cfg, train=train), overrides))
    return stages


def stage_done(stage: Stage) -> str | None:
    """The final checkpoint of a finished stage (its newest checkpoint at its last step), else None."""
    path = latest_checkpoint(stage.dir)
    if path is None:
        return None
    return path if int(read_state(path).get("step", -1)) >= stage.cfg.train.max_steps else None


class RecipeRunner:
    """Runs the stages of `recipe` in order (see the module docstring). compose(overrides) ->
    RunConfig; run(cfg) trains one stage (train.run)."""

    def __init__(self, recipe: RecipeConfig, cli: list[str], compose, run=None):
        from .build import run as run_one

        self.recipe, self.cli = recipe, list(cli)
        self.run_stage = run or run_one
        base = compose(self.cli)
        t = base.train
        if t.resume != "auto":
            raise ValueError(f"train.resume={t.resume}: a recipe resumes each stage from its own newest "
                             f"checkpoint (train.resume=auto); use train.overwrite=true to start over")
        if t.dry_run:
            raise ValueError("train.dry_run with a recipe: dry-run one stage with its settings instead "
                             "(e.g. the stage's set overrides on the command line)")
        self.run_dir, self.overwrite = t.run_dir, t.overwrite
        self.is_main = int(os.environ.get("RANK", "0")) == 0
        self.stages = plan_stages(recipe, self.cli, compose, base.model.name, t.run_dir)
        self.base = base

    def run(self) -> dict:
        """Trains every stage not finished yet; returns the recipe state (recipe.json). Stops,
        with the state saying where, when a stage stops before its last step (a stop signal,
        train.max_hours): the same command continues it."""
        device = pick_device(self.base.train.device, int(os.environ.get("LOCAL_RANK", "0")))
        owns = init_world(world_backend(self.base.parallel.backend, device), device)
        try:
            self._start()
            state = self._state()
            for stage in self.stages:
                final = stage_done(stage)
                if final is None:
                    self._train(stage, state)
                    final = stage_done(stage)
                    if final is None:  # stopped early: the same command continues here
                        self._record(state, stage, "stopped")
                        if self.is_main:
                            log.info("recipe %s stopped in stage %s; run the same command to continue",
                                     self.recipe.name, stage.spec.name)
                        return state
                elif self.is_main:
                    log.info("recipe %s: stage %s is done (%s)", self.recipe.name, stage.spec.name, final)
                self._record(state, stage, "done", final)
                if self.recipe.eval:
                    self._evaluate(stage, final)
                if stage.index + 1 < len(self.stages):
                    nxt = self.stages[stage.index + 1]
                    nxt.cfg = dataclasses.replace(nxt.cfg, train=dataclasses.replace(
                        nxt.cfg.train, init_from=final, data_from=final))
            state["current"] = None
            self._write(state)
            if self.is_main:
                log.info("recipe %s finished in %s; final checkpoints: %s", self.recipe.name, self.run_dir,
                         ", ".join(f"{s['name']} {s['final']}" for s in state["stages"]))
            return state
        finally:
            if owns:
                dist.barrier()
                dist.destroy_process_group()

    # -- state ---------------------------------------------------------------------------------

    def _start(self) -> None:
        """Rank 0: train.overwrite deletes the stages and state of an earlier run; a recipe.json
        of another recipe or other stages is refused. Every rank waits for that."""
        if self.is_main:
            path = os.path.join(self.run_dir, RECIPE_FILE)
            if self.overwrite:
                for old in (os.path.join(self.run_dir, STAGES_DIR), path):
                    if os.path.isdir(old):
                        shutil.rmtree(old)
                    elif os.path.lexists(old):
                        os.remove(old)
                log.warning("train.overwrite=true: the recipe in %s starts over", self.run_dir)
            elif os.path.isfile(path):
                self._check_same(path)
        if dist.is_initialized():
            dist.barrier()

    def _check_same(self, path: str) -> None:
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read the recipe state ({e}); delete it or set train.overwrite=true") from None
        mine = [(s.spec.name, self._rel(s.dir)) for s in self.stages]
        theirs = [(s.get("name"), s.get("dir")) for s in saved.get("stages", [])]
        if saved.get("recipe") != self.recipe.name or theirs != mine:
            raise ValueError(f"{path}: train.run_dir holds recipe {saved.get('recipe')} with stages "
                             f"{[n for n, _ in theirs]}, not {self.recipe.name} with {[n for n, _ in mine]}; "
                             f"use another train.run_dir or train.overwrite=true")
        for s, entry in zip(self.stages, saved["stages"]):
            if entry.get("status") == "done" and entry.get("max_steps") != s.cfg.train.max_steps:
                raise ValueError(f"{path}: stage {s.spec.name} finished with {entry.get('max_steps')} steps "
                                 f"but the recipe now gives it {s.cfg.train.max_steps}; a finished stage "
                                 f"cannot change (another train.run_dir starts a new recipe run)")

    def _state(self) -> dict:
        return {"recipe": self.recipe.name, "current": None, "stages": [
            {"name": s.spec.name, "dir": self._rel(s.dir), "tokens": s.spec.tokens, "max_steps": s.cfg.train.max_steps,
             "seq_len": s.cfg.data.seq_len, "global_batch": s.cfg.train.global_batch, "status": "pending",
             "final": None, "overrides": s.overrides} for s in self.stages]}

    def _record(self, state: dict, stage: Stage, status: str, final: str | None = None) -> None:
        entry = state["stages"][stage.index]
        entry["status"], entry["final"] = status, final and self._rel(final)
        state["current"] = stage.spec.name if status in ("running", "stopped") else state["current"]
        self._write(state)

    def _rel(self, path: str) -> str:
        """`path` relative to the run directory, as recipe.json keeps paths (the run may move)."""
        return os.path.relpath(path, self.run_dir)

    def _write(self, state: dict) -> None:
        if not self.is_main:
            return
        state["updated"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        os.makedirs(self.run_dir, exist_ok=True)
        write_file(os.path.join(self.run_dir, RECIPE_FILE), (json.dumps(state, indent=2) + "\n").encode(),
                   atomic=True)

    def _link(self, stage: Stage) -> None:
        """RUN_DIR/current -> the running stage's directory (replaced atomically)."""
        link = os.path.join(self.run_dir, CURRENT_LINK)
        tmp = f"{link}.tmp{os.getpid()}"
        try:
            if os.path.lexists(tmp):
                os.remove(tmp)
            os.symlink(os.path.relpath(stage.dir, self.run_dir), tmp)
            os.replace(tmp, link)
        except OSError as e:  # a filesystem without symlinks: recipe.json still says it
            log.warning("cannot link %s to the running stage (%s)", link, e)

    # -- stages --------------------------------------------------------------------------------

    def _train(self, stage: Stage, state: dict) -> None:
        t = stage.cfg.train
        if self.is_main:
            os.makedirs(stage.dir, exist_ok=True)
            self._link(stage)
            log.info("recipe %s: stage %d/%d %s, %d steps of %s tokens (seq_len %d, global batch %d)%s",
                     self.recipe.name, stage.index + 1, len(self.stages), stage.spec.name, t.max_steps,
                     f"{t.global_batch * stage.cfg.data.seq_len:,}", stage.cfg.data.seq_len, t.global_batch,
                     f", from {t.init_from}" if t.init_from else "")
        self._record(state, stage, "running")
        self.run_stage(stage.cfg)
        gc.collect()  # the stage's model, optimizer and buffers, before the next stage allocates
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _evaluate(self, stage: Stage, final: str) -> None:
        """Rank 0: the long-context evaluation of the stage's final checkpoint (once: an existing
        result is kept); the other ranks wait for it."""
        if self.is_main:
            from analysis.long_context import default_out, evaluate_long_context, write_result
            from analysis.evaluate import resolve_device

            out = default_out(final)
            device = resolve_device("auto")
            if not os.path.exists(out) and self._fits(stage, device):
                seq_len = stage.cfg.data.seq_len
                start = time.perf_counter()
                result = evaluate_long_context(
                    final, seq_len=seq_len, samples=self.recipe.eval_samples,
                    passkey_lengths=[seq_len] if self.recipe.passkey_trials else [],
                    passkey_trials=self.recipe.passkey_trials, device=device,
                    first_bucket=min(1024, max(1, seq_len // 8)))
                write_result(out, result)
                log.info("stage %s evaluated in %.0f s: loss by position %s%s -> %s", stage.spec.name,
                         time.perf_counter() - start,
                         ", ".join(f"{b} {v:.3f}" for b, v in result["loss_by_position"].items()),
                         "".join(f", passkey at {n}: {a:.0%}" for n, a in result["passkey"].items()), out)
        if dist.is_initialized():
            dist.barrier()


    def _fits(self, stage: Stage, device) -> bool:
        """Whether the evaluation's fp32 copy of the model fits in 80% of rank 0's GPU (a model
        the size of sb76b does not: evaluate its export with launch/evaluate.py elsewhere)."""
        if torch.device(device).type != "cuda":
            return True
        from model import build_model

        needed = 4 * build_model(stage.cfg.model, device="meta").num_params()["total"]
        have = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        if needed <= 0.8 * have:
            return True
        log.warning("stage %s: not evaluated, the model's fp32 weights (%.0f GiB) do not fit rank 0's GPU "
                    "(%.0f GiB); run launch/evaluate.py on the final checkpoint where they do, or set "
                    "recipe.eval=false", stage.spec.name, needed / 2**30, have / 2**30)
        return False


def recipe_config(tree: dict) -> RecipeConfig | None:
    """The `recipe:` section of a composed config (None when there is none)."""
    section = tree.get("recipe")
    if section is None:
        return None
    return from_dict(RecipeConfig, section, "recipe")
