"""Data pipeline: sources -> tokens -> packed samples -> deterministic, resumable batches."""

from .array_source import ArraySource
from .config import DataConfig, SourceSpec, resolve_cache_dir
from .demo import DemoData, prepare_demo
from .document_source import DocumentSource
from .loader import Loader
from .packing import IGNORE_INDEX, pack
from .permutation import DocumentPermutation, permutation_key
from .sources import OpenedSources, check_sources, open_sources
from .stream import DocumentStream, Plan
from .tokenizer import SentencePieceTokenizer, Tokenizer, train_sentencepiece
from .validation import ValidationSet, ValidationSplit

__all__ = [
    "IGNORE_INDEX",
    "ArraySource",
    "DataConfig",
    "DemoData",
    "DocumentPermutation",
    "DocumentSource",
    "DocumentStream",
    "Loader",
    "OpenedSources",
    "Plan",
    "SentencePieceTokenizer",
    "SourceSpec",
    "Tokenizer",
    "ValidationSet",
    "ValidationSplit",
    "build_loader",
    "check_sources",
    "open_sources",
    "pack",
    "permutation_key",
    "prepare_demo",
    "resolve_cache_dir",
    "train_sentencepiece",
]


def build_loader(
    cfg: DataConfig, *, seed: int, global_batch: int, dp_rank: int = 0, dp_size: int = 1
) -> Loader:
    """The loader for the data `cfg` names (the demo corpus is prepared or read from the cache)."""
    return Loader(cfg, seed=seed, global_batch=global_batch, dp_rank=dp_rank, dp_size=dp_size)
