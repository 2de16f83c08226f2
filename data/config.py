"""Typed configuration of the data pipeline (arrives as a plain dataclass; no Hydra here)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Data sources this version knows; `data.sources` maps each name to its preparation function.
SOURCES = ("demo",)


@dataclass
class DataConfig:
    """Where tokens come from and how they are cut into samples.

    name:       the data source; "demo" is a small English corpus built from the Python
                standard library's docstrings, with its own sentencepiece tokenizer.
    seq_len:    tokens per sample `L`; batches are `[B, L]`.
    cache_dir:  where prepared data is cached; empty -> `$SPIKINGBRAIN_CACHE`, else
                `$XDG_CACHE_HOME/spikingbrain`, else `~/.cache/spikingbrain`.
    demo_chars: size of the demo corpus in characters (whole documents, so a little more; a
                CPython 3.11 standard library offers about 1.6M, more than that gives all).
    vocab_size: size of the demo tokenizer's vocabulary.
    """

    name: str = "demo"
    seq_len: int = 256
    cache_dir: str = ""
    demo_chars: int = 2_000_000
    vocab_size: int = 2048

    def __post_init__(self) -> None:
        if self.name not in SOURCES:
            raise ValueError(f"data.name must be one of {list(SOURCES)}, got {self.name!r}")
        _require_int("data.seq_len", self.seq_len, minimum=8)
        # Below these sizes sentencepiece cannot build a byte-fallback vocabulary worth having.
        _require_int("data.demo_chars", self.demo_chars, minimum=10_000)
        _require_int("data.vocab_size", self.vocab_size, minimum=384)
        if not isinstance(self.cache_dir, (str, os.PathLike)):
            raise ValueError(f"data.cache_dir must be a path string, got {self.cache_dir!r}")

    def resolved_cache_dir(self) -> Path:
        """The cache root this config points at (resolved now, so environment changes apply)."""
        return resolve_cache_dir(self.cache_dir)


def resolve_cache_dir(cache_dir: str | os.PathLike = "") -> Path:
    """Cache root: `cache_dir` if set, else `$SPIKINGBRAIN_CACHE`, `$XDG_CACHE_HOME/spikingbrain`,
    `~/.cache/spikingbrain` (empty environment variables count as unset)."""
    if str(cache_dir):
        return Path(cache_dir).expanduser()
    if os.environ.get("SPIKINGBRAIN_CACHE"):
        return Path(os.environ["SPIKINGBRAIN_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "spikingbrain"
    return Path.home() / ".cache" / "spikingbrain"


def _require_int(setting: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{setting} must be an integer >= {minimum}, got {value!r}")
