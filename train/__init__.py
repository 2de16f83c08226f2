"""Trainer, optimizer and schedule, run configuration, metrics."""
from .build import build, dry_run, run
from .config import RunConfig, TrainConfig, from_dict
from .trainer import Trainer

__all__ = ["build", "dry_run", "run", "RunConfig", "TrainConfig", "from_dict", "Trainer"]
