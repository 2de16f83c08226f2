"""Finding and loading the checkpoint a run continues from (`train.resume`)."""
from __future__ import annotations

import copy
import dataclasses
import logging
import os

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
import yaml
from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                     set_optimizer_state_dict)

from .checkpoint import (CONFIG_FILE, FORMAT, LATEST, REQUIRED, SHARDS_DIR, STATE_FILE, VERSION,
                         checkpoints_dir, latest_checkpoint, read_state, rng_file, seed_rng, set_rng_state,
                         sharded_state, verify_checkpoint)

log = logging.getLogger("train")


def resolve_resume(cfg) -> str | None:
    """The checkpoint directory to resume from, or None to start fresh. cfg: RunConfig.

    "auto" follows `run_dir/checkpoints/latest` when it exists (unless train.overwrite starts the
    run over); a path may name a checkpoint, a `checkpoints/` folder or a run directory (the last
    two stand for their `latest`)."""
    t = cfg.train
    if t.resume == "never" or t.overwrite:
        return None
    if t.resume == "auto":
        path = latest_checkpoint(t.run_dir)
        if path is None:
            return None
        check_complete(path, f"{os.path.join(checkpoints_dir(t.run_dir), LATEST)} names {path}, which")
        return path
    path = t.resume
    for folder in (path, checkpoints_dir(path)):
        if os.path.isfile(os.path.join(folder, LATEST)):
            with open(os.path.join(folder, LATEST)) as f:
                path = os.path.join(folder, f.read().strip())
            break
    check_complete(path, f"train.resume={t.resume}: {path}")
    return path


def check_complete(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise ValueError(f"{what} is not a checkpoint directory")
    missing = [name for name in REQUIRED if not os.path.isfile(os.path.join(path, name))]
    if missing:
        raise ValueError(f"{what} is not a complete checkpoint (missing {', '.join(missing)})")
    state = read_state(path)
    if state.get("format") != FORMAT:
        raise ValueError(f"{os.path.join(path, STATE_FILE)}: not a {FORMAT} state file")
    if state.get("version") != VERSION:
        raise ValueError(f"{os.path.join(path, STATE_FILE)}: checkpoint format version "
                         f"{state.get('version')}, this version of the framework reads version {VERSION} "
                         f"(sharded {SHARDS_DIR}/); export it to a Hugging Face directory with the "
                         f"version that wrote it and continue with train.init_from")


def check_unused_run_dir(t) -> None:
    """Refuses train.resume=never in a run directory that holds a run (TrainConfig `t`): its
    metrics rows and checkpoints would mix with the new run's."""
    folder = checkpoints_dir(t.run_dir)
    held = [name for name, there in (("metrics.jsonl", os.path.isfile(os.path.join(t.run_dir, "metrics.jsonl"))),
                                     ("checkpoints", os.path.isdir(folder) and bool(os.listdir(folder)))) if there]
    if held:
        raise ValueError(f"train.run_dir={t.run_dir} already holds a run ({', '.join(held)}) and "
                         f"train.resume=never would mix a second one into it: set train.overwrite=true to "
                         f"delete it and start over, train.resume=auto to continue it, or choose another "
                         f"train.run_dir")


def check_model_config(path: str, model_cfg) -> None:
    """Refuses a checkpoint whose model settings differ from the run's, naming the first one."""
    file = os.path.join(path, CONFIG_FILE)
    try:
        with open(file) as f:
            saved = (yaml.safe_load(f) or {}).get("model", {})
    except (OSError, yaml.YAMLError, AttributeError) as e:
        raise ValueError(f"{file}: cannot read the run config ({e})") from None
    current = dataclasses.asdict(model_cfg)
    for key, value in current.items():
        if saved.get(key, value) != value:
            raise ValueError(f"checkpoint {path} was trained with model.{key}={saved[key]!r} but this run "
                             f"has model.{key}={value!r}; use the checkpoint's model settings or set "
                             f"train.resume=never (or another train.run_dir)")
    extra = sorted(set(saved) - set(current))
    if extra:
        raise ValueError(f"{file}: unknown model setting model.{extra[0]}")


def load_checkpoint(path: str, trainer, model: torch.nn.Module, keep_loader: bool = False) -> dict:
    """Restores model (strict), optimizer, step, tokens, loader and this rank's RNG from `path`.
    model: the model being trained (sharded in place by the engine); keep_loader: leave the data
    loader where it is (a rollback, `train.faults`). Returns the checkpoint's state.json."""
    cfg, mesh = trainer.cfg, trainer.mesh
    state = read_state(path)
    check_model_config(path, cfg.model)
    trainer.checkpointer.last_bytes = verify_checkpoint(path, trainer.checkpointer.group)
    shards = os.path.join(path, SHARDS_DIR)
    target = sharded_state(model, trainer.optimizer)  # this rank's shards, in the layout of this run
    # The checkpoint keeps one rank's param_groups (non-tensor entries are written once), which
    # under pipeline parallelism list only that rank's stage: keep this run's own groups (their
    # hyperparameters come from this run's config; the learning rate is set every step).
    groups = copy.deepcopy(target["optim"]["param_groups"])
    try:
        dcp.load(target, checkpoint_id=shards)  # reads only this rank's rows, resharding as needed
    except (Exception, CheckpointException) as e:  # damaged or missing shard files, tensors that do not fit the model
        raise ValueError(f"{shards}: cannot restore the model and optimizer ({_first_line(e)})") from None
    target["optim"]["param_groups"] = groups
    options = StateDictOptions(strict=True)
    set_model_state_dict(model, target["model"], options=options)
    set_optimizer_state_dict(model, trainer.optimizer, target["optim"], options=options)
    try:
        if not keep_loader:
            trainer.loader.load_state_dict(state["loader"])
        trainer.step, trainer.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        trainer.skipped_steps = int(state.get("skipped_steps", 0))
        trainer.faults.load_state_dict(state.get("faults"))  # checkpoints without one: a fresh state
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{os.path.join(path, STATE_FILE)}: malformed checkpoint state ({e})") from None
    rng = os.path.join(path, rng_file(mesh.rank))
    if state.get("world_size") == mesh.world_size and os.path.isfile(rng):
        try:  # our own file: numpy state is not a tensor
            saved = torch.load(rng, weights_only=False)
        except Exception as e:  # damaged (checkpoints without a manifest are not verified)
            raise ValueError(f"{rng}: cannot read the RNG state ({_first_line(e)})") from None
        set_rng_state(saved)
    else:  # a different rank layout: fresh streams from (seed, step, rank)
        seed_rng(cfg.train.seed, trainer.step, mesh.rank)
    if mesh.is_main:
        log.info("resumed from %s at step %d (saved by %d rank(s), now %d)", path, trainer.step,
                 state.get("world_size", 0), mesh.world_size)
    return state


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    # torch.distributed.checkpoint wraps per-rank failures in long reports: keep the cause
    for line in text.splitlines():
        if "Error" in line and ":" in line:
            return line.strip()[:500]
    return text.splitlines()[0][:500] if text else type(e).__name__
