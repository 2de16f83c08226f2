"""Export a training checkpoint to the Hugging Face-style layout that `launch/convert.py` writes.

A checkpoint directory (`run_dir/checkpoints/step_NNNNNNNN`, see `train.checkpoint`) holds the
model state sharded over the ranks that wrote it (`shards/`, our parameter names) and the
resolved run config (`config.yaml`); a run directory or its `checkpoints/` folder stands for its
newest complete checkpoint (`latest`). Tensors are read one at a time, whatever the number of
ranks or the ZeRO stage that wrote them.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml

from data.demo import prepare_demo
from data.shards import read_manifest

from model.convert import save_hf_checkpoint
from .checkpoint import CONFIG_FILE, LATEST, METADATA, CheckpointTensors, verify_checkpoint
from .config import RunConfig, from_dict


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory from a checkpoint, `checkpoints/` or run directory path."""
    for folder in (path, os.path.join(path, "checkpoints")):
        latest = os.path.join(folder, LATEST)
        if os.path.isfile(latest):
            with open(latest) as f:
                return os.path.join(folder, f.read().strip())
    if os.path.isfile(os.path.join(path, METADATA)):
        return path
    raise ValueError(f"{path}: not a checkpoint (no {METADATA}) and no checkpoints/{LATEST} to follow")


def read_checkpoint(checkpoint: str) -> tuple[str, RunConfig, CheckpointTensors]:
    """(checkpoint directory, its run config, its model tensors read on access) for a checkpoint,
    run or `checkpoints/` directory, every file verified against the checkpoint's manifest.
    Errors name the file at fault."""
    path = resolve_checkpoint(checkpoint)
    verify_checkpoint(path)
    config_path = os.path.join(path, CONFIG_FILE)
    try:
        with open(config_path) as f:
            cfg = from_dict(RunConfig, yaml.safe_load(f))
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{config_path}: cannot read the run config ({e})") from None
    return path, cfg, CheckpointTensors(path)


def data_tokenizer(data) -> str | None:
    """The tokenizer the run's data was made with: `data.tokenizer`, the demo corpus's
    sentencepiece model (rebuilt from its cache if gone), or the one the first shard directory's
    manifest names (None when that file no longer exists)."""
    if data.tokenizer:
        return data.tokenizer
    if data.name == "demo":
        return str(prepare_demo(data).tokenizer.path)
    try:
        path = read_manifest(Path(data.source_specs()[0].path).expanduser())["tokenizer"]["path"]
    except (OSError, ValueError, KeyError):
        return None
    return path if os.path.exists(path) else None


def export_checkpoint(checkpoint: str, dst: str, *, dtype: torch.dtype = torch.bfloat16,
                      overwrite: bool = False, max_shard_size="5GB") -> dict:
    """Writes DST (config.json, safetensors shards + index, the modeling files for
    transformers, the tokenizer of the run's data, else of its `train.init_from` folder) from a
    training checkpoint. Returns a summary."""
    path, cfg, state = read_checkpoint(checkpoint)
    init_from = cfg.train.init_from
    tokenizer = data_tokenizer(cfg.data) or (init_from if init_from and os.path.isdir(init_from) else None)
    index = save_hf_checkpoint(state, cfg.model, dst, dtype=dtype, overwrite=overwrite,
                               max_shard_size=max_shard_size, tokenizer_from=tokenizer)
    return {"exported": dst, "checkpoint": path, "model": cfg.model.name,
            "tensors": len(index["weight_map"]), "bytes": index["metadata"]["total_size"],
            "dtype": str(dtype).removeprefix("torch.")}
