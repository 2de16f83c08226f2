"""Opening the sources a `DataConfig` names, and the checks that must pass before training.

`open_sources(cfg)` gives the loader its `DocumentSource`s, their mixture weights and, where
known, the tokenizer: the demo corpus (prepared or read from the cache) or shard directories
(`data.path` / `data.sources`). `check_sources` refuses, before any step runs, data that would
train wrongly: empty sources, duplicate names, sources made by different tokenizers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .config import DataConfig
from .demo import prepare_demo
from .document_source import DocumentSource
from .shards import ShardSource
from .tokenizer import Tokenizer, load_tokenizer


@dataclass(frozen=True)
class OpenedSources:
    """What the loader reads: sources, their weights (by tokens), the tokenizer if known, and
    the setting each source came from (for error messages)."""

    sources: list[DocumentSource]
    weights: list[float]
    tokenizer: Tokenizer | None
    settings: list[str]


def open_sources(cfg: DataConfig) -> OpenedSources:
    """The sources `cfg` names, opened and checked (see `check_sources`)."""
    if cfg.name == "demo":
        demo = prepare_demo(cfg)
        opened = OpenedSources([demo.source], [1.0], demo.tokenizer, ["data.name=demo"])
    else:
        specs = cfg.source_specs()
        settings = ["data.path" if cfg.path else f"data.sources[{i}]" for i in range(len(specs))]
        sources = []
        for spec, setting in zip(specs, settings):
            if not Path(spec.path).expanduser().is_dir():
                raise ValueError(f"{setting}: no shard directory at {spec.path!r}; prepare one "
                                 f"with launch/prepare_data.py or fix the path")
            try:
                sources.append(ShardSource(Path(spec.path).expanduser(), name=spec.name or None))
            except ValueError as e:  # incomplete, truncated or corrupted shards
                raise ValueError(f"{setting}: {e}") from e
        tokenizer = _load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
        opened = OpenedSources(sources, [s.weight for s in specs], tokenizer, settings)
    check_sources(opened.sources, opened.tokenizer, opened.settings)
    return opened


def _load_tokenizer(path: str) -> Tokenizer:
    try:
        return load_tokenizer(Path(path).expanduser())
    except (OSError, ValueError) as e:
        raise ValueError(f"data.tokenizer: {e}") from e


def check_sources(
    sources: Sequence[DocumentSource], tokenizer: Tokenizer | None, settings: Sequence[str]
) -> None:
    """Refuse empty sources, duplicate names and tokens from different tokenizers (ValueError)."""
    if not sources:
        raise ValueError("no data sources: set data.path or data.sources")
    seen: dict[str, str] = {}
    for source, setting in zip(sources, settings):
        if len(source.doc_lengths) == 0 or int(source.doc_lengths.sum()) == 0:
            raise ValueError(f"{setting}: data source {source.name!r} holds no tokens; "
                             f"remove it or prepare it again")
        if source.name in seen:
            raise ValueError(f"{setting} and {seen[source.name]} are both named {source.name!r}: "
                             f"names key the loader state; set a distinct name")
        seen[source.name] = setting
    reference = tokenizer.fingerprint if tokenizer is not None else sources[0].fingerprint
    told = "data.tokenizer" if tokenizer is not None else f"{settings[0]} ({sources[0].name!r})"
    for source, setting in zip(sources, settings):
        check = getattr(source, "check_tokenizer", None)
        if check is not None and tokenizer is not None:
            try:
                check(reference)  # the source's own message names its files
            except ValueError as e:
                raise ValueError(f"{setting}: {e}") from e
        if source.fingerprint != reference:
            raise ValueError(
                f"{setting}: data source {source.name!r} was tokenized by another tokenizer "
                f"(fingerprint {source.fingerprint[:12]}...) than {told} "
                f"({reference[:12]}...); prepare all sources with the same tokenizer")
