"""`ArraySource`: a `DocumentSource` over one token array and its document offsets.

The array may live in memory or be memory-mapped (`np.load(..., mmap_mode="r")`, `np.memmap`);
reads are views, so nothing is copied until the packer writes the batch.
"""

from __future__ import annotations

import numpy as np


class ArraySource:
    """Documents `tokens[offsets[d] : offsets[d+1]]`, each ending with the tokenizer's EOS.

    tokens:       `[N]` integer token ids (any integer dtype; typically uint16/uint32).
    doc_offsets:  int `[D+1]`, non-decreasing, from 0 to N.
    max_token_id: largest id in `tokens`; computed (one pass over the data) when not given.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        doc_offsets: np.ndarray,
        *,
        name: str,
        domain: str = "",
        fingerprint: str = "",
        max_token_id: int | None = None,
    ) -> None:
        # A plain ndarray view: slicing an np.memmap subclass costs several times more per read.
        tokens = np.asarray(tokens)
        offsets = np.asarray(doc_offsets, dtype=np.int64)
        if tokens.ndim != 1 or tokens.dtype.kind not in "ui":
            raise ValueError(f"source {name!r}: tokens must be a 1-D integer array, "
                             f"got {tokens.dtype} {tokens.shape}")
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(tokens):
            raise ValueError(f"source {name!r}: document offsets must run from 0 to the number "
                             f"of tokens ({len(tokens)})")
        self.doc_lengths = np.diff(offsets)
        if (self.doc_lengths < 0).any():
            raise ValueError(f"source {name!r}: document offsets must be non-decreasing")
        self.tokens = tokens
        self.doc_offsets = offsets
        self.name = name
        self.domain = domain
        self.fingerprint = fingerprint
        if max_token_id is None:
            max_token_id = int(tokens.max()) if len(tokens) else -1
        self.max_token_id = int(max_token_id)

    @classmethod
    def from_documents(cls, docs: list, *, name: str, dtype=np.int64, **kwargs) -> "ArraySource":
        """A source holding `docs` (sequences of token ids), e.g. for tests and small corpora."""
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = np.concatenate([np.asarray(d, dtype=dtype) for d in docs]) if docs else \
            np.zeros(0, dtype=dtype)
        return cls(tokens, offsets, name=name, **kwargs)

    def read(self, doc: int, start: int, stop: int) -> np.ndarray:
        """Tokens `[start, stop)` of document `doc` (a view)."""
        base = int(self.doc_offsets[doc])
        return self.tokens[base + start : base + stop]

    def __repr__(self) -> str:
        return (f"ArraySource({self.name!r}, documents={len(self.doc_lengths)}, "
                f"tokens={len(self.tokens)})")
