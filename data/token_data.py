"""How token ids are stored: the smallest unsigned dtype that holds the vocabulary."""

from __future__ import annotations

import numpy as np


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding ids `0 .. vocab_size-1` (uint16 up to 65536 entries)."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
