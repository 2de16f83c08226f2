"""Shared test helpers (import as `tests.helpers`)."""
import os

import yaml

from model.config import ModelConfig
from train.config import from_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_config(name: str, **overrides) -> ModelConfig:
    """conf/model/NAME.yaml as a ModelConfig, with top-level fields overridden."""
    with open(os.path.join(ROOT, "conf", "model", f"{name}.yaml")) as f:
        data = yaml.safe_load(f)
    data.update(overrides)
    return from_dict(ModelConfig, data, "model")
