"""Typed configuration of the data pipeline (arrives as a plain dataclass; no Hydra here)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Data this version reads: the embedded demo corpus, or token shards from launch/prepare_data.py.
NAMES = ("demo", "shards")
PACKING_MODES = ("mixed", "domain")


@dataclass
class SourceSpec:
    """One source of a mixture: a shard directory written by `launch/prepare_data.py`.

    path:   the directory (holding `manifest.json`).
    weight: share of the mixture's tokens (weights are normalised over the sources).
    name:   tag keying the source's order and loader state; empty -> the shards' own name.
            Renaming a source changes its document order and restarts it in a resumed run.
    """

    path: str
    weight: float = 1.0
    name: str = ""


@dataclass
class DataConfig:
    """Where tokens come from and how they are cut into samples.

    name:       "demo": a small English corpus built from the Python standard library's
                docstrings, with its own sentencepiece tokenizer (no other setting needed);
                "shards": token shards prepared by `launch/prepare_data.py` (`path` or `sources`).
    seq_len:    tokens per sample `L`; batches are `[B, L]`. May change between stages of a run
                (8k -> 32k): the document stream continues where it stopped.
    cache_dir:  where prepared data is cached; empty -> `$SPIKINGBRAIN_CACHE`, else
                `$XDG_CACHE_HOME/spikingbrain`, else `~/.cache/spikingbrain`.
    demo_chars: size of the demo corpus in characters (whole documents, so a little more; a
                CPython 3.11 standard library offers about 1.6M, more than that gives all).
    vocab_size: size of the demo tokenizer's vocabulary.
    path:       shorthand for one shard directory (`sources: [{path: ...}]`).
    sources:    a mixture: `[{path, weight, name}, ...]` (see `SourceSpec`); weights are by tokens.
    packing:    "mixed": documents of all sources interleave within a sample; "domain": each
                sample is filled from the sources of one domain only (long-context stages).
    prefetch:   batches prepared ahead in a background thread (0: none); never changes the order.
    tokenizer:  optional tokenizer path (sentencepiece `.model`, or a `tokenizer.json` or folder
                holding one); when set, every source must have been made by it.
    val_docs:   documents of each source held out of training as the validation split
                (`data/validation.py`; the same documents whatever the seed, ranks or `seq_len`);
                0: no split, the training stream is as without this setting.
    """

    name: str = "demo"
    seq_len: int = 256
    cache_dir: str = ""
    demo_chars: int = 2_000_000
    vocab_size: int = 2048
    path: str = ""
    sources: list[SourceSpec] = field(default_factory=list)
    packing: str = "mixed"
    prefetch: int = 0
    tokenizer: str = ""
    val_docs: int = 0

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise ValueError(f"data.name must be one of {list(NAMES)}, got {self.name!r}")
        _require_int("data.seq_len", self.seq_len, minimum=8)
        # Below these sizes sentencepiece cannot build a byte-fallback vocabulary worth having.
        _require_int("data.demo_chars", self.demo_chars, minimum=10_000)
        _require_int("data.vocab_size", self.vocab_size, minimum=384)
        _require_int("data.prefetch", self.prefetch, minimum=0)
        _require_int("data.val_docs", self.val_docs, minimum=0)
        for setting in ("cache_dir", "path", "tokenizer"):
            if not isinstance(getattr(self, setting), (str, os.PathLike)):
                raise ValueError(f"data.{setting} must be a path string, "
                                 f"got {getattr(self, setting)!r}")
        if self.packing not in PACKING_MODES:
            raise ValueError(f"data.packing must be one of {list(PACKING_MODES)}, "
                             f"got {self.packing!r}")
        if not isinstance(self.sources, (list, tuple)):
            raise ValueError(f"data.sources must be a list of {{path, weight, name}}, "
                             f"got {self.sources!r}")
        self.sources = [_source_spec(s, f"data.sources[{i}]") for i, s in enumerate(self.sources)]
        names = [s.name for s in self.sources if s.name]
        for i, s in enumerate(self.sources):
            if s.name and names.count(s.name) > 1:
                raise ValueError(f"data.sources[{i}].name {s.name!r} is used by more than one "
                                 f"source: names key the loader state and must be unique")
        if self.name == "demo" and (self.sources or str(self.path)):
            raise ValueError("data.path and data.sources are for data.name=shards; the demo "
                             "source takes no paths")
        if self.name == "shards" and bool(self.sources) == bool(str(self.path)):
            raise ValueError("data.name=shards needs exactly one of data.path (one shard "
                             "directory) or data.sources (a mixture)")

    def source_specs(self) -> list[SourceSpec]:
        """The shard sources, `data.path` expanded to a one-source mixture."""
        return list(self.sources) if self.sources else [SourceSpec(path=str(self.path))]

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


def _source_spec(value: Any, setting: str) -> SourceSpec:
    """A `SourceSpec` from a mapping (YAML/Hydra) or a `SourceSpec`, checked."""
    if isinstance(value, SourceSpec):
        value = {"path": value.path, "weight": value.weight, "name": value.name}
    if not isinstance(value, dict):
        raise ValueError(f"{setting} must be a mapping {{path, weight, name}}, got {value!r}")
    unknown = sorted(set(value) - {"path", "weight", "name"})
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(f'{setting}.{k}' for k in unknown)}; "
                         f"known: name, path, weight")
    path, weight, name = value.get("path"), value.get("weight", 1.0), value.get("name", "")
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"{setting}.path must be a shard directory, got {path!r}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or \
            not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"{setting}.weight must be > 0, got {weight!r}")
    if not isinstance(name, str):
        raise ValueError(f"{setting}.name must be a string, got {name!r}")
    return SourceSpec(path=str(path), weight=float(weight), name=name)


def _require_int(setting: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{setting} must be an integer >= {minimum}, got {value!r}")
