"""The validation split: whole documents held out of every training source, and the fixed
validation samples made of them (`data.val_docs`).

Which documents: source `name` with `D` documents holds out the documents at positions
`0 .. val_docs-1` of the keyed permutation `DocumentPermutation(D, validation_key(name))`. The key
depends on the source's name alone (not on `train.seed`), so runs with other seeds, data-parallel
sizes, batch sizes or `seq_len` hold out the same documents and their validation losses compare;
a larger `val_docs` keeps the smaller one's documents and adds more.

Why held-out documents of the training sources rather than separately prepared validation
shards: the split exists for every source with no extra preparation (the demo too), it follows
the training mixture source by source, and it excludes its documents from training by
construction. The training stream is not rebuilt around the split: it visits the same keyed
order as without one and passes over the held-out documents as if they were empty
(`DocumentStream(held_out=...)`), so turning the split on or off leaves the loader state format,
its resume and every other source's order as they were.

The validation samples: the held-out documents, sources in their configured order and each
source's documents in validation order, packed back to back into samples of `seq_len` tokens
like training samples (positions restart at each document and sample start; no label crosses a
document), the last sample padded with ignored tokens. The documents are the same whatever
`seq_len`; only the cuts between samples move.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import numpy as np

from .document_source import DocumentSource
from .packing import IGNORE_INDEX
from .permutation import DocumentPermutation


def validation_key(name: str) -> bytes:
    """Key of the validation order of source `name` (independent of the run's seed)."""
    return hashlib.sha256(f"spikingbrain-validation\0{name}".encode()).digest()


def validation_order(source: DocumentSource, count: int) -> np.ndarray:
    """The first `count` documents of `source`'s validation order, int64 `[count]`."""
    n = len(source.doc_lengths)
    return DocumentPermutation(n, validation_key(source.name))(np.arange(count))


class ValidationSplit:
    """`val_docs` documents held out of each of `sources` (none when 0).

    order[i]: source i's held-out documents in validation order, int64 `[val_docs]` (empty
              without a split).
    """

    def __init__(self, sources: Sequence[DocumentSource], val_docs: int) -> None:
        if isinstance(val_docs, bool) or not isinstance(val_docs, int) or val_docs < 0:
            raise ValueError(f"data.val_docs must be an integer >= 0, got {val_docs!r}")
        self.val_docs = val_docs
        self.names = [s.name for s in sources]
        self.order: list[np.ndarray] = []
        for source in sources:
            lengths = np.asarray(source.doc_lengths)
            if val_docs >= len(lengths):
                raise ValueError(f"data.val_docs={val_docs} would hold out every document of data "
                                 f"source {source.name!r} ({len(lengths)} documents); lower it")
            ids = validation_order(source, val_docs) if val_docs else np.zeros(0, np.int64)
            if int(lengths.sum()) == int(lengths[ids].sum()):
                raise ValueError(f"data.val_docs={val_docs} holds out every token of data source "
                                 f"{source.name!r}; lower it")
            self.order.append(ids)

    def __bool__(self) -> bool:
        return self.val_docs > 0

    def state(self) -> dict[str, int]:
        """What the loader state records of the split: documents held out per source name."""
        return {name: self.val_docs for name in self.names}


class ValidationSet:
    """The validation samples of `split`'s documents, `seq_len` tokens each (see the module).

    documents, tokens: held-out documents and their tokens; targets: tokens with a label
    (every token but each document's last); num_samples: samples of `seq_len` they fill.
    """

    def __init__(self, sources: Sequence[DocumentSource], split: ValidationSplit, seq_len: int,
                 pad_id: int = 0) -> None:
        if not split:
            raise ValueError("no validation split: set data.val_docs (documents held out of each "
                             "source)")
        self.sources, self.seq_len, self.pad_id = list(sources), seq_len, pad_id
        self._source = np.concatenate([np.full(len(o), i, np.int64) for i, o in enumerate(split.order)])
        self._doc = np.concatenate(split.order)
        lengths = np.concatenate([np.asarray(s.doc_lengths)[o] for s, o in zip(sources, split.order)])
        keep = lengths > 0
        self._source, self._doc, lengths = self._source[keep], self._doc[keep], lengths[keep]
        self._starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # [docs + 1]
        self.documents = len(lengths)
        self.tokens = int(self._starts[-1])
        self.targets = int((lengths - 1).sum())
        self.num_samples = math.ceil(self.tokens / seq_len)

    def samples(self, first: int, count: int) -> dict[str, np.ndarray]:
        """Samples `first .. first+count-1` as int64 `[count, seq_len]` arrays `input_ids`, `labels`,
        `position_ids`; samples at or past `num_samples` (and the tail of the last) are padding:
        `pad_id` inputs with ignored labels."""
        length = self.seq_len
        lo, hi = first * length, (first + count) * length
        inputs = np.full(hi - lo, self.pad_id, dtype=np.int64)
        labels = np.full(hi - lo, IGNORE_INDEX, dtype=np.int64)
        starts = self._starts
        real = min(hi, self.tokens)
        boundaries = [np.arange(0, hi - lo, length)]  # every sample starts a piece
        if lo < real:
            j0 = int(np.searchsorted(starts, lo, side="right")) - 1
            j1 = int(np.searchsorted(starts, real, side="left"))
            for j in range(j0, j1):
                ds, de = int(starts[j]), int(starts[j + 1])
                a, b = max(ds, lo), min(de, real)
                want = min(b + 1, de) - a  # one token past the piece: its last label
                source = self.sources[self._source[j]]
                chunk = source.read(int(self._doc[j]), a - ds, a - ds + want)
                if len(chunk) != want:
                    raise RuntimeError(f"data source {source.name!r} returned {len(chunk)} tokens "
                                       f"for document {int(self._doc[j])}: the source is damaged")
                inputs[a - lo:b - lo] = chunk[:b - a]
                labels[a - lo:b - lo - 1] = chunk[1:b - a]
                labels[b - lo - 1] = chunk[b - a] if want > b - a else IGNORE_INDEX
            boundaries.append(starts[j0 + 1:j1] - lo)
        if lo < self.tokens < hi:
            boundaries.append(np.array([self.tokens - lo]))  # the padding is a piece of its own
        marks = np.zeros(hi - lo, dtype=np.int64)
        at = np.concatenate(boundaries).astype(np.int64)
        marks[at] = at
        positions = np.arange(hi - lo, dtype=np.int64) - np.maximum.accumulate(marks)
        shape = (count, length)
        return {"input_ids": inputs.reshape(shape), "labels": labels.reshape(shape),
                "position_ids": positions.reshape(shape)}
