"""Deterministic, resumable loader of packed samples for data-parallel training.

There is one global stream of samples (`stream.DocumentStream`: per-source keyed document orders,
a deterministic token-weighted mixture, documents packed back to back). Each step consumes the
next `G` samples (G = global batch); data-parallel rank `r` takes the contiguous slice
`[r*b, (r+1)*b)` of them, b = G / dp_size. Every rank plans the whole global batch (document
lengths only, so the stream state stays identical everywhere) but reads only its own samples'
tokens. The state (`state_dict`) is the stream's: a few integers per source, independent of rank,
data-parallel size, batch size and `seq_len`, so a run resumes on any number of ranks and across
`seq_len` stages and continues the same stream.

With `data.val_docs`, the documents of the validation split (`data/validation.py`) are held out
of the stream, and `validation_set()` gives the fixed samples made of them.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Sequence

import numpy as np
import torch

from .config import DataConfig
from .document_source import DocumentSource
from .packing import pack
from .prefetch import Prefetcher
from .sources import check_sources, open_sources
from .stream import DocumentStream, Plan
from .tokenizer import Tokenizer
from .validation import ValidationSet, ValidationSplit


class Loader:
    """Batches `{"input_ids", "labels", "position_ids"}`, each int64 `[b, L]`, for one DP rank.

    By default the sources are opened from `cfg` (`data.name`, `data.path`/`data.sources`);
    `sources` (with `weights` by tokens, default equal, and optionally their `tokenizer`)
    replaces that, e.g. for in-memory `ArraySource`s.
    """

    def __init__(
        self,
        cfg: DataConfig,
        *,
        seed: int,
        global_batch: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        sources: Sequence[DocumentSource] | None = None,
        weights: Sequence[float] | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"train.seed must be a non-negative integer, got {seed!r}")
        if not isinstance(dp_size, int) or dp_size < 1:
            raise ValueError(f"the data-parallel size must be >= 1, got {dp_size!r}")
        if not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank!r}")
        if not isinstance(global_batch, int) or global_batch < 1:
            raise ValueError(f"train.global_batch must be >= 1, got {global_batch!r}")
        if global_batch % dp_size:
            raise ValueError(f"train.global_batch={global_batch} must be divisible by the "
                             f"data-parallel size {dp_size}")
        if sources is None:
            opened = open_sources(cfg)
            sources, weights, tokenizer = opened.sources, opened.weights, opened.tokenizer
        else:
            sources = list(sources)
            weights = [1.0] * len(sources) if weights is None else list(weights)
            if len(weights) != len(sources) or any(not w > 0 for w in weights):
                raise ValueError(f"need one weight > 0 per source, got {weights} for "
                                 f"{len(sources)} sources")
            check_sources(sources, tokenizer, [f"source {i}" for i in range(len(sources))])
        self.cfg = cfg
        self.seed = seed
        self.global_batch = global_batch
        self.local_batch = global_batch // dp_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.sources = sources
        self.tokenizer = tokenizer
        self.split = ValidationSplit(sources, cfg.val_docs)
        self.stream = DocumentStream(sources, weights, seed=seed, packing=cfg.packing,
                                     held_out=self.split.order if self.split else None)
        self._handed_out = self.stream.state_dict()  # the state after the last batch returned
        self._prefetcher: Prefetcher | None = None
        self._id_limit: int | None = None  # set by check_vocab: every batch's ids stay below it

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary, or (tokenizer unknown) one more than the largest id."""
        if self.tokenizer is not None:
            return self.tokenizer.vocab_size
        return max(s.max_token_id for s in self.sources) + 1

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_id if self.tokenizer is not None else None

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one global batch (all ranks)."""
        return self.global_batch * self.cfg.seq_len

    def validation_set(self) -> ValidationSet:
        """The samples of the validation split at this loader's `seq_len` (ValueError naming
        data.val_docs without a split); padding tokens are the EOS id (0 when unknown)."""
        eos = self.eos_id
        return ValidationSet(self.sources, self.split, self.cfg.seq_len, 0 if eos is None else eos)

    def check_vocab(self, model_vocab_size: int) -> None:
        """Refuse (ValueError) data whose token ids the model's embedding cannot look up: now, by
        the tokenizer's size and the largest ids the sources record, and from then on in every
        batch, on the host (damaged data or an understated manifest get past the first check)."""
        self.close()  # batches prepared ahead were not checked
        self._id_limit = model_vocab_size
        if self.tokenizer is not None and self.tokenizer.vocab_size > model_vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but "
                             f"model.vocab_size is {model_vocab_size}; raise model.vocab_size "
                             f"or shrink the tokenizer")
        for source in self.sources:
            if source.max_token_id >= model_vocab_size:
                raise ValueError(f"data source {source.name!r} holds token id "
                                 f"{source.max_token_id} but model.vocab_size is "
                                 f"{model_vocab_size}; raise model.vocab_size or prepare the "
                                 f"data with the model's tokenizer")

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's share of the next global batch; advances by one global batch."""
        if not self.cfg.prefetch:
            batch, state = self._producer()()
        else:
            if self._prefetcher is None:
                self._prefetcher = Prefetcher(self._producer(), self.cfg.prefetch)
            batch, state = self._prefetcher.get()
        self._handed_out = state
        return batch

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Where the global stream stands after the last batch returned (prefetched batches not
        handed out yet do not count); the same on every rank."""
        return copy.deepcopy(self._handed_out)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the loader that saved `state` stopped (any rank count,
        batch size or `seq_len`)."""
        self.close()
        try:
            self.stream.load_state_dict(state)
        except (KeyError, TypeError) as e:
            raise ValueError(f"the data loader state is malformed ({e!r})") from e
        self._handed_out = self.stream.state_dict()

    def close(self) -> None:
        """Stop prefetching (batches prepared ahead are dropped; the state is unaffected)."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None
            self.stream.load_state_dict(self._handed_out)

    def __del__(self) -> None:
        if getattr(self, "_prefetcher", None) is not None:
            self._prefetcher.close()

    def _producer(self):
        # A plain function of the stream, not a bound method: the prefetch thread must not keep
        # the loader alive.
        return functools.partial(
            _next_batch, self.stream, self.sources, self.global_batch,
            self.dp_rank * self.local_batch, self.local_batch, self.cfg.seq_len, self._id_limit,
        )


def _next_batch(
    stream: DocumentStream,
    sources: Sequence[DocumentSource],
    global_batch: int,
    first: int,
    count: int,
    seq_len: int,
    id_limit: int | None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Plan the next global batch, pack samples `[first, first+count)`; also the state after it.
    Token ids at or above `id_limit` (None: no check) raise a ValueError naming where they are."""
    plan = stream.plan(global_batch, seq_len)
    state = stream.state_dict()
    arrays = pack(plan, sources, first, count, seq_len)
    if id_limit is not None:
        check_ids(arrays["input_ids"], arrays["labels"], id_limit, plan, sources, first)
    return {k: torch.from_numpy(v) for k, v in arrays.items()}, state


def check_ids(inputs: np.ndarray, labels: np.ndarray, limit: int, plan: Plan,
              sources: Sequence[DocumentSource], first: int) -> None:
    """Raise ValueError if a token id of the packed `inputs`/`labels` `[b, L]` (samples `first..`
    of `plan`) is >= `limit`, naming the source, document and offset of the first such token
    (a shard source also names its file). A max over the batch when nothing is wrong."""
    if max(int(inputs.max()), int(labels.max())) < limit:
        return
    # a label is the token after its input: a bad one is reported at the token it reads
    flat_in, flat_lab = inputs.reshape(-1), labels.reshape(-1)
    pos = int(np.argmax((flat_in >= limit) | (flat_lab >= limit)))
    shift = 0 if flat_in[pos] >= limit else 1
    lo = plan.first[first]
    ends = np.cumsum(np.subtract(plan.stop[lo:], plan.start[lo:]))
    j = int(np.searchsorted(ends, pos, side="right"))
    seg = lo + j
    source = sources[plan.source[seg]]
    offset = plan.start[seg] + pos - (int(ends[j - 1]) if j else 0) + shift
    value = int(flat_in[pos] if shift == 0 else flat_lab[pos])
    where = getattr(source, "where", None)
    raise ValueError(
        f"data source {source.name!r} holds token id {value} at token {offset} of document "
        f"{plan.doc[seg]}{f' ({where(plan.doc[seg], offset)})' if where else ''}, but "
        f"model.vocab_size is {limit}: the data is damaged or was prepared with another "
        f"tokenizer; prepare it again")
