"""A prepared token stream: what every data source hands to the loader."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .tokenizer import Tokenizer


@dataclass(frozen=True)
class TokenData:
    """Documents tokenized and concatenated, each followed by the tokenizer's EOS.

    tokens:    `[N]` unsigned ints (see `token_dtype`), possibly memory-mapped.
    tokenizer: the tokenizer that produced them.
    meta:      JSON-able facts about the data (source, counts, tokenizer fingerprint).
    """

    tokens: np.ndarray
    tokenizer: Tokenizer
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tokens.ndim != 1 or self.tokens.dtype.kind not in "ui":
            raise ValueError(
                f"token stream must be a 1-D integer array, got {self.tokens.dtype} {self.tokens.shape}"
            )


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding ids `0 .. vocab_size-1` (uint16 up to 65536 entries)."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
