"""Packing: planned document pieces -> `input_ids`, `labels`, `position_ids`, each int64 `[B, L]`.

A sample is `L` input tokens: the pieces (segments) of documents the stream planned for it, back
to back. Documents never leak into each other:
- `position_ids` restart at 0 at each document start and at each sample start (a document cut
  by the previous sample continues from position 0), so the model derives `cu_seqlens` from them;
- the label of an input is the next token of the *same* document: the label of a document's last
  token (its EOS) is `IGNORE_INDEX`, so nothing learns to predict the next document's first token.
  The label of a sample's last input, when its document continues in a later sample, is that
  continuation's first token (read one token past the segment).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .document_source import DocumentSource
from .stream import Plan

IGNORE_INDEX = -100


def pack(
    plan: Plan, sources: Sequence[DocumentSource], first_sample: int, num_samples: int, seq_len: int
) -> dict[str, np.ndarray]:
    """Samples `first_sample .. first_sample+num_samples-1` of `plan` as int64 `[B, L]` arrays.

    Only these samples' tokens are read (a data-parallel rank reads its own slice only).
    """
    lo, hi = plan.first[first_sample], plan.first[first_sample + num_samples]
    total = num_samples * seq_len
    inputs = np.empty(total, dtype=np.int64)
    labels = np.empty(total, dtype=np.int64)
    sizes = np.empty(hi - lo, dtype=np.int64)
    o = 0
    for j in range(lo, hi):
        start, stop, length = plan.start[j], plan.stop[j], plan.length[j]
        m = stop - start
        source = sources[plan.source[j]]
        # One token past the piece: the label of its last input, unless the document ends here.
        want = min(stop + 1, length) - start
        chunk = source.read(plan.doc[j], start, start + want)
        if len(chunk) != want:
            raise RuntimeError(f"data source {source.name!r} returned {len(chunk)} tokens for "
                               f"tokens [{start}, {start + want}) of document {plan.doc[j]} "
                               f"({length} tokens): the source is damaged")
        inputs[o : o + m] = chunk[:m]
        labels[o : o + m - 1] = chunk[1:m]
        labels[o + m - 1] = chunk[m] if want > m else IGNORE_INDEX
        sizes[j - lo] = m
        o += m
    if o != total:  # the plan is built to fill every sample exactly
        raise AssertionError(f"planned {o} tokens for {num_samples} samples of {seq_len}")
    piece_starts = np.cumsum(sizes) - sizes
    positions = np.arange(total, dtype=np.int64) - np.repeat(piece_starts, sizes)
    shape = (num_samples, seq_len)
    return {
        "input_ids": inputs.reshape(shape),
        "labels": labels.reshape(shape),
        "position_ids": positions.reshape(shape),
    }
