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
    dry_run: bool = False
    init_from: str = ""            # Hugging Face-style directory (launch/convert.py output) to start from
    precision: str = "auto"        # auto: bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"
    save_every: int = 0            # checkpoint every N steps; 0 = only at the end and on SIGTERM/SIGUSR1
    keep_checkpoints: int = 3      # newest complete checkpoints kept; 0 = keep all
    resume: str = "auto"           # auto (run_dir/checkpoints/latest if any), never, or a checkpoint path
    overwrite: bool = False        # start over: delete run_dir's checkpoints/ and metrics.jsonl first
    max_skipped_steps: int = 10    # NaN/Inf steps in a row tolerated before the run stops
    recompute: str = "none"        # activation recomputation: none, full (whole blocks) or selective
    compile: str = "auto"          # torch.compile of norms, SwiGLU and RoPE: auto (regions on CUDA), none, regions
    check_memory: bool = True      # on CUDA, refuse a run whose planned peak exceeds the GPU's memory
    peak_tflops: float | None = None  # one device's bf16 peak for MFU; None: by CUDA device name (train/flops.py)

    def __post_init__(self):
        for key in ("max_steps", "global_batch", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("micro_batch", "save_every", "keep_checkpoints", "max_skipped_steps", "warmup_steps", "weight_decay", "grad_clip", "lr"):
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
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"train.peak_tflops must be > 0 (or null: from the device name), got {self.peak_tflops}")
        if not self.run_dir:
            raise ValueError("train.run_dir must not be empty")


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
