"""Data sources by name: each turns a `DataConfig` into a prepared `TokenData`."""

from __future__ import annotations

from typing import Callable

from .config import SOURCES, DataConfig
from .demo import prepare_demo
from .token_data import TokenData

_PREPARE: dict[str, Callable[[DataConfig], TokenData]] = {"demo": prepare_demo}
assert set(_PREPARE) == set(SOURCES), "config.SOURCES and the source table disagree"


def prepare(cfg: DataConfig) -> TokenData:
    """Prepare (or read from the cache) the token stream named by `cfg.name`."""
    if cfg.name not in _PREPARE:
        raise ValueError(f"data.name must be one of {sorted(_PREPARE)}, got {cfg.name!r}")
    return _PREPARE[cfg.name](cfg)
