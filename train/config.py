"""Typed run configuration. `from_dict` turns a plain nested dict (from Hydra, YAML or JSON) into
dataclasses, rejecting unknown keys and wrong types with the full setting name."""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field

from data.config import DataConfig
from model.config import ModelConfig
from parallel.config import ParallelConfig

RECOMPUTE = ("none", "full", "selective")
COMPILE = ("auto", "none", "regions")
PROGRESS = ("auto", "on", "off")
WANDB = ("offline", "online", "disabled")


@dataclass
class TrainConfig:
    max_steps: int = 300
    global_batch: int = 16         # sequences per optimizer step, over all data-parallel ranks
    micro_batch: int = 0           # sequences per forward/backward on one rank; 0 = no accumulation
    lr: float = 3e-4
    min_lr_ratio: float = 0.1      # cosine decays to lr * min_lr_ratio at max_steps
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0         # 0 disables clipping
    seed: int = 1234
    run_dir: str = "runs/default"
    log_every: int = 10
    eval_every: int = 0            # validation loss on the data.val_docs split every N steps and at the last; 0 = off
    dry_run: bool = False
    init_from: str = ""            # weights to start from: a launch/convert.py directory or a training checkpoint (model only)
    data_from: str = ""            # training checkpoint whose data stream (and token count) a fresh run continues
    stage: str = ""                # name of the recipe stage this run is (in metrics rows); set by the recipe runner
    precision: str = "auto"        # auto: bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"
    save_every: int = 0            # checkpoint every N steps; 0 = only at the end and on SIGTERM/SIGUSR1
    keep_checkpoints: int = 3      # newest complete checkpoints kept; 0 = keep all
    resume: str = "auto"           # auto (run_dir/checkpoints/latest if any), never, or a checkpoint path
    overwrite: bool = False        # start over: delete run_dir's checkpoints/ and metrics.jsonl first
    max_skipped_steps: int = 10    # skipped steps in a row tolerated; then one rollback to the last checkpoint, then the run stops
    spike_zscore: float = 6.0      # a loss above mean + z * std of the last spike_window accepted steps skips its step; 0 = off
    spike_window: int = 200        # accepted steps' losses in the spike window (checked from min(window, 20) on)
    hang_timeout: float = 1800.0   # seconds a step may make no progress before the rank dumps stacks and exits; 0 = off
    max_hours: float = 0.0         # save and stop (exit 0) before this many hours since the process started; 0 = no limit
    recompute: str = "none"        # activation recomputation: none, full (whole blocks) or selective
    compile: str = "auto"          # torch.compile of norms, SwiGLU and RoPE: auto (regions on CUDA), none, regions
    check_memory: bool = True      # on CUDA, refuse a run whose planned peak exceeds the GPU's memory
    peak_tflops: float | None = None  # one device's bf16 peak for MFU; None: by CUDA device name (train/flops.py)
    progress: str = "auto"         # progress bar on rank 0's stderr: auto (a terminal only), on, off
    wandb: str = "offline"         # Weights & Biases: offline (files in run_dir/wandb), online, disabled
    wandb_project: str = "spikingbrain"
    wandb_name: str = ""           # the wandb run's name; "" = the run directory's name
    firing_stats: bool = True      # with model.spike.enabled: firing rates in metrics rows (train/observe.py)

    def __post_init__(self):
        for key in ("max_steps", "global_batch", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("micro_batch", "eval_every", "save_every", "keep_checkpoints", "max_skipped_steps", "warmup_steps", "weight_decay", "grad_clip", "lr"):
            if getattr(self, key) < 0:
                raise ValueError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"train.precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"train.recompute must be one of {', '.join(RECOMPUTE)}, got {self.recompute!r}")
        if self.compile not in COMPILE:
            raise ValueError(f"train.compile must be one of {', '.join(COMPILE)}, got {self.compile!r}")
        if not self.resume:
            raise ValueError('train.resume must be "auto", "never" or a checkpoint path, got ""')
        if self.overwrite and self.resume not in ("auto", "never"):
            raise ValueError(f"train.overwrite=true starts the run directory over and cannot resume from "
                             f"train.resume={self.resume}: use train.resume=auto or never, or another train.run_dir")
        for key, modes in (("progress", PROGRESS), ("wandb", WANDB)):
            if getattr(self, key) not in modes:
                raise ValueError(f"train.{key} must be one of {', '.join(modes)}, got {getattr(self, key)!r}")
        if self.wandb != "disabled" and not self.wandb_project:
            raise ValueError("train.wandb_project must not be empty (or train.wandb=disabled)")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"train.peak_tflops must be > 0 (or null: from the device name), got {self.peak_tflops}")
        if not self.run_dir:
            raise ValueError("train.run_dir must not be empty")
        for key in ("spike_zscore", "hang_timeout", "max_hours"):
            if not 0 <= getattr(self, key) < float("inf"):
                raise ValueError(f"train.{key} must be a number >= 0 (0 = off), got {getattr(self, key)}")
        if self.spike_window < 2:
            raise ValueError(f"train.spike_window must be >= 2 (losses for a mean and a std), got {self.spike_window}")


@dataclass
class RunConfig:
    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        # a sample is one document at worst, so positions reach seq_len - 1
        if self.data.seq_len > self.model.max_position_embeddings:
            raise ValueError(f"data.seq_len={self.data.seq_len} exceeds model.max_position_embeddings="
                             f"{self.model.max_position_embeddings}; lower data.seq_len (or raise "
                             f"model.max_position_embeddings if the model was trained for it)")


def from_dict(cls, data, path: str = ""):
    """Builds dataclass `cls` from a nested dict; errors name the setting (e.g. `train.lr`)."""
    if not isinstance(data, dict):
        raise ValueError(f"{path or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ValueError(f"unknown setting(s) {', '.join(where + k for k in unknown)}; "
                         f"known: {', '.join(sorted(fields))}")
    kwargs = {name: _convert(hints[name], value, f"{path}.{name}" if path else name)
              for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ValueError(f"{path or 'config'}: {e}") from None


def _convert(tp, value, path):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _convert(next(a for a in args if a is not type(None)), value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{path} must be true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (tp is int and value != int(value)):
            raise ValueError(f"{path} must be {'an integer' if tp is int else 'a number'}, got {value!r}")
        return tp(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{path} must be a string, got {value!r}")
        return value
    if tp is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{path} must be a list, got {value!r}")
        return list(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{path} must be a mapping, got {value!r}")
        return dict(value)
    return value
