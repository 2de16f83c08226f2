"""Synthetic sources whose every token tells where it came from, for exact stream checks.

Token `k * BASE + t` is token `t` of source `k`'s concatenated documents, so any batch decodes
back to (source, document, index in document) and "the next token of the same document" is
simply `token + 1`.
"""

import numpy as np

from data import ArraySource, DocumentPermutation, permutation_key

BASE = 10_000_000


def synthetic_source(k, n_docs, *, seed=0, lengths=(1, 40), name=None, domain="", fingerprint="tok"):
    """Source `k`: `n_docs` documents with lengths drawn uniformly from `[lengths[0], lengths[1]]`."""
    rng = np.random.default_rng([seed, k])
    sizes = rng.integers(lengths[0], lengths[1] + 1, size=n_docs)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    tokens = k * BASE + np.arange(offsets[-1], dtype=np.int64)
    return ArraySource(tokens, offsets, name=name or f"s{k}", domain=domain, fingerprint=fingerprint)


def order(source, seed, epoch):
    """The document ids of `source` in the stream order of `epoch`."""
    n = len(source.doc_lengths)
    return DocumentPermutation(n, permutation_key(seed, source.name, epoch))(np.arange(n))


def epoch_tokens(source, seed, epoch):
    """All tokens of `source` in the stream order of `epoch`."""
    return np.concatenate([source.read(d, 0, source.doc_lengths[d]) for d in order(source, seed, epoch)])


def source_of(tokens):
    return np.asarray(tokens) // BASE


def is_document_end(tokens, sources):
    """Whether each token is the last of its document."""
    tokens = np.asarray(tokens)
    out = np.zeros(tokens.shape, dtype=bool)
    for k, source in enumerate(sources):
        ends = k * BASE + source.doc_offsets[1:] - 1
        out |= np.isin(tokens, ends)
    return out


def is_document_start(tokens, sources):
    tokens = np.asarray(tokens)
    out = np.zeros(tokens.shape, dtype=bool)
    for k, source in enumerate(sources):
        out |= np.isin(tokens, k * BASE + source.doc_offsets[:-1])
    return out
