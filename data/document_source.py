"""The seam between stored tokens and the loader: a source of tokenized documents.

Every data source (the embedded demo, token shards written by `launch/prepare_data.py`, later
others) presents itself as a `DocumentSource`; the loader only ever asks for document lengths and
token slices, so the sample order, mixtures and packing are the same whatever the storage.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np


class DocumentSource(Protocol):
    """Tokenized documents of one source, each ending with the tokenizer's EOS.

    name:        tag of the source (mixture weights and loader state are keyed by it).
    domain:      domain tag; per-domain packing keeps a sample's documents within one domain.
    fingerprint: sha256 of the tokenizer that produced the tokens.
    doc_lengths: int64 `[D]`, tokens of each document (EOS included).
    max_token_id: largest token id stored (checked against the model's vocabulary up front).

    A source may also offer `where(doc, offset) -> str`, naming where a token is stored (a shard
    source: its file and byte offset), for error messages.
    """

    name: str
    domain: str
    fingerprint: str
    doc_lengths: np.ndarray
    max_token_id: int

    def read(self, doc: int, start: int, stop: int) -> np.ndarray:
        """Tokens `[start, stop)` of document `doc` (a view where the storage allows it)."""
        ...
