"""Where a fresh run's weights and data position come from (`train.init_from`, `train.data_from`).

- `train.init_from` names either a Hugging Face-style directory (`launch/convert.py`, a Qwen
  checkpoint converted to SpikingBrain) or a training checkpoint (a checkpoint, `checkpoints/` or
  run directory; the last two stand for their `latest`). From a training checkpoint only the
  model weights are read, each rank its own rows of the sharded files whatever the layout that
  wrote them; the optimizer starts afresh. This is how a recipe stage starts from the previous
  stage's final weights with its own schedule and parallel layout.
- `train.data_from` names a training checkpoint whose data loader state and token count a fresh
  run continues: the document stream goes on where that run stopped, also when data.seq_len,
  the batch size or the rank count changed (8k -> 32k -> 128k stages).

A resumed run (`train.resume`) ignores both: its own checkpoint holds weights and data position.
"""
from __future__ import annotations

import os

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     set_model_state_dict)

from model.hf import HFStateReader
from parallel.materialize import load_weights
from .checkpoint import LATEST, SHARDS_DIR, STATE_FILE, checkpoints_dir, read_state, verify_checkpoint
from .resume import _first_line, check_complete, check_model_config


def training_checkpoint(path: str) -> str | None:
    """The checkpoint directory `path` stands for (a checkpoint, `checkpoints/` or run directory),
    or None when `path` is no training checkpoint (a converted directory, or nothing)."""
    for folder in (path, checkpoints_dir(path)):
        latest = os.path.join(folder, LATEST)
        if os.path.isfile(latest):
            with open(latest) as f:
                return os.path.join(folder, f.read().strip())
    return path if os.path.isfile(os.path.join(path, STATE_FILE)) else None


def load_init_from(model: torch.nn.Module, path: str, model_cfg, group=None) -> tuple[str, int]:
    """Fills the (sharded) model from `train.init_from` = `path`, each rank reading only the rows
    it owns. Returns (what was read, number of tensors). group: the ranks verifying a training
    checkpoint's files together (None: this rank alone)."""
    checkpoint = training_checkpoint(path)
    try:
        if checkpoint is None:
            reader = HFStateReader(path, model_cfg)  # checks dims, names and shapes before any read
            load_weights(model, reader.rows)
            return path, len(reader.names)
        check_complete(checkpoint, f"train.init_from={path}: {checkpoint}")
        check_model_config(checkpoint, model_cfg)
        verify_checkpoint(checkpoint, group)
        return checkpoint, load_checkpoint_weights(model, checkpoint)
    except ValueError as e:
        raise ValueError(f"train.init_from: {e}") from e


def load_checkpoint_weights(model: torch.nn.Module, checkpoint: str) -> int:
    """The model weights of training checkpoint `checkpoint` into `model` (strict: every tensor of
    the model must be there with its shape), resharded to this run's layout. Returns the count."""
    shards = os.path.join(checkpoint, SHARDS_DIR)
    target = {"model": get_model_state_dict(model)}
    try:
        dcp.load(target, checkpoint_id=shards)  # reads only the model entries, this rank's rows
    except (Exception, CheckpointException) as e:
        raise ValueError(f"{shards}: cannot read the model weights ({_first_line(e)})") from None
    set_model_state_dict(model, target["model"], options=StateDictOptions(strict=True))
    return len(target["model"])


def continue_data(trainer, path: str) -> str:
    """Continues the data stream and token count of training checkpoint `path` (train.data_from)
    in a fresh run's `trainer`. Returns the checkpoint directory read."""
    checkpoint = training_checkpoint(path)
    if checkpoint is None:
        raise ValueError(f"train.data_from={path}: not a training checkpoint (no {STATE_FILE}, no "
                         f"checkpoints/{LATEST} to follow)")
    check_complete(checkpoint, f"train.data_from={path}: {checkpoint}")
    state = read_state(checkpoint)
    try:
        trainer.loader.load_state_dict(state["loader"])
        trainer.tokens_seen = int(state["tokens_seen"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"train.data_from={path}: {os.path.join(checkpoint, STATE_FILE)}: cannot continue "
                         f"its data stream ({e})") from None
    return checkpoint
