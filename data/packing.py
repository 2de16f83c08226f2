"""Packing a token stream into fixed-length samples with document boundaries.

The stream is documents back to back, each followed by EOS. Sample `i` is the window
`tokens[i*L : i*L + L + 1]`: its first `L` tokens are the inputs, its last `L` the labels
(next token). Documents never leak into each other:
- `position_ids` restart at 0 at each document start (the token after an EOS, and the first
  token of a sample), so the model can derive `cu_seqlens` from them;
- the label of an EOS input (the first token of the next document) is `IGNORE_INDEX`, since
  it cannot be predicted from the previous document.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100


def num_samples(num_tokens: int, seq_len: int) -> int:
    """How many whole samples of `seq_len` (plus the one label token) a stream holds."""
    return max(0, (num_tokens - 1) // seq_len)


def gather_windows(tokens: np.ndarray, sample_ids: np.ndarray, seq_len: int) -> np.ndarray:
    """Windows `[B, L+1]` of samples `sample_ids` `[B]`, in the stream's dtype."""
    starts = np.asarray(sample_ids, dtype=np.int64)[:, None] * seq_len
    return tokens[starts + np.arange(seq_len + 1, dtype=np.int64)]


def windows_to_batch(windows: np.ndarray, eos_id: int) -> dict[str, np.ndarray]:
    """Split windows `[B, L+1]` into int64 `input_ids`, `labels` and `position_ids`, each `[B, L]`."""
    windows = windows.astype(np.int64)
    input_ids = windows[:, :-1]
    labels = windows[:, 1:].copy()
    is_eos = input_ids == eos_id
    labels[is_eos] = IGNORE_INDEX

    batch, seq_len = input_ids.shape
    index = np.broadcast_to(np.arange(seq_len, dtype=np.int64), (batch, seq_len))
    starts = np.zeros((batch, seq_len), dtype=bool)
    starts[:, 0] = True
    starts[:, 1:] = is_eos[:, :-1]
    last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return {
        "input_ids": np.ascontiguousarray(input_ids),
        "labels": labels,
        "position_ids": index - last_start,
    }


def pack_samples(
    tokens: np.ndarray, sample_ids: np.ndarray, seq_len: int, eos_id: int
) -> dict[str, np.ndarray]:
    """Samples `sample_ids` `[B]` of `tokens` as `input_ids`, `labels`, `position_ids` `[B, L]`."""
    return windows_to_batch(gather_windows(tokens, sample_ids, seq_len), eos_id)
