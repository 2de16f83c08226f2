"""Data pipeline: sources -> tokens -> packed samples -> deterministic, resumable batches."""

from .config import DataConfig, resolve_cache_dir
from .loader import Loader
from .packing import IGNORE_INDEX, pack_samples
from .sources import prepare
from .token_data import TokenData
from .tokenizer import SentencePieceTokenizer, Tokenizer, train_sentencepiece

__all__ = [
    "IGNORE_INDEX",
    "DataConfig",
    "Loader",
    "SentencePieceTokenizer",
    "TokenData",
    "Tokenizer",
    "build_loader",
    "pack_samples",
    "prepare",
    "resolve_cache_dir",
    "train_sentencepiece",
]


def build_loader(
    cfg: DataConfig, *, seed: int, global_batch: int, dp_rank: int = 0, dp_size: int = 1
) -> Loader:
    """The loader for `cfg.name`'s data, prepared (or read from the cache) first."""
    return Loader(
        cfg,
        seed=seed,
        global_batch=global_batch,
        dp_rank=dp_rank,
        dp_size=dp_size,
        data=prepare(cfg),
    )
