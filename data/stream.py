"""The global document stream: which source feeds next, which document, and where samples cut it.

Each source visits its documents in epochs; epoch `e` of source `name` is the keyed permutation
`DocumentPermutation(D, permutation_key(seed, name, e))`, so the order depends on nothing but
(seed, name, epoch): not on data-parallel size, workers, batch size or `seq_len`. A source that
runs out starts its next epoch on its own.

Mixture weights are by tokens. A deterministic scheduler (no RNG) picks the next document's
source: the one whose consumed tokens fall furthest below `weight * total` (ties: first listed).
Samples are filled with whole documents in stream order; a document cut at a sample's end
continues at the start of the next sample drawn from its group, so no token is skipped or repeated.
Groups: `packing="mixed"` puts all sources in one group (documents of all sources interleave
within a sample); `packing="domain"` groups sources by their domain tag, and each sample is
filled from one group only (the group of the source furthest below its share).

The state is a few integers per source (epoch, position in the epoch's order, offset inside the
current document, tokens consumed) plus the samples consumed: it is in documents and tokens, so a
run can change `seq_len`, batch size or data-parallel size and continue the same stream.

Held-out documents (the validation split, `data/validation.py`) keep their places in every
epoch's order but are passed over as if empty, so the stream is the one without a split minus
those documents. The state then also records how many documents each source holds out; a resume
that holds out documents the checkpoint's stream may already have trained on (a split turned on
or enlarged) says how many were.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .config import PACKING_MODES
from .document_source import DocumentSource
from .permutation import DocumentPermutation, permutation_key

log = logging.getLogger("data")

STATE_VERSION = 2


@dataclass
class Plan:
    """Where the samples of one global batch come from, as segments (one per document piece).

    Segment `j` is tokens `[start[j], stop[j])` of document `doc[j]` (of `length[j]` tokens) of
    source `source[j]`; sample `i` is segments `first[i] .. first[i+1]-1`, back to back.
    """

    source: list[int] = field(default_factory=list)
    doc: list[int] = field(default_factory=list)
    start: list[int] = field(default_factory=list)
    stop: list[int] = field(default_factory=list)
    length: list[int] = field(default_factory=list)
    first: list[int] = field(default_factory=lambda: [0])


class DocumentStream:
    """Plans samples of `seq_len` tokens from `sources` mixed by `weights` (normalised here)."""

    CHUNK = 4096  # document ids computed ahead per source (one vectorised permutation call)

    def __init__(
        self,
        sources: Sequence[DocumentSource],
        weights: Sequence[float],
        *,
        seed: int,
        packing: str = "mixed",
        held_out: Sequence[np.ndarray] | None = None,
    ) -> None:
        """held_out: per source, the documents held out of training in validation order
        (`ValidationSplit.order`); None: no split."""
        if packing not in PACKING_MODES:
            raise ValueError(f"data.packing must be one of {list(PACKING_MODES)}, got {packing!r}")
        self.seed = seed
        self.names = [s.name for s in sources]
        self._lengths = [np.asarray(s.doc_lengths) for s in sources]
        total = float(sum(weights))
        self.weights = [float(w) / total for w in weights]
        domains = [s.domain for s in sources] if packing == "domain" else [""] * len(sources)
        order = list(dict.fromkeys(domains))
        self._groups = [[i for i, d in enumerate(domains) if d == g] for g in order]
        self._group_of = [order.index(d) for d in domains]
        self._everyone = list(range(len(sources)))
        self._held_out = None if held_out is None else [np.asarray(h, dtype=np.int64) for h in held_out]
        self._held_sorted = None if held_out is None else [np.sort(h) for h in self._held_out]
        self._reset()

    def _reset(self) -> None:
        k = len(self.names)
        self.epoch, self.position, self.offset = [0] * k, [0] * k, [0] * k
        self.tokens, self.mix_tokens = [0] * k, [0] * k
        self.samples = 0
        self._ahead: list[tuple[int, int, list[int], list[int]] | None] = [None] * k

    def plan(self, num_samples: int, seq_len: int) -> Plan:
        """Advance the stream by `num_samples` samples of `seq_len` tokens; where they come from."""
        p = Plan()
        src, doc, start, stop, length, first = p.source, p.doc, p.start, p.stop, p.length, p.first
        offset, tokens, mix = self.offset, self.tokens, self.mix_tokens
        for _ in range(num_samples):
            members = self._groups[0] if len(self._groups) == 1 else \
                self._groups[self._group_of[self._pick(self._everyone)]]
            s = next((i for i in members if offset[i]), -1)  # a document cut by the last sample
            if s < 0:
                s = self._pick(members)
            room = seq_len
            while True:
                d, n = self._current(s)
                a = offset[s]
                take = min(n - a, room)
                if take > 0:
                    src.append(s)
                    doc.append(d)
                    start.append(a)
                    stop.append(a + take)
                    length.append(n)
                    room -= take
                    tokens[s] += take
                    mix[s] += take
                if a + take == n:
                    self._next_document(s)
                else:
                    offset[s] = a + take
                if not room:
                    break
                s = self._pick(members)
            first.append(len(src))
        self.samples += num_samples
        return p

    def _pick(self, members: list[int]) -> int:
        """The member whose consumed tokens fall furthest below its share (first on ties)."""
        if len(members) == 1:
            return members[0]
        total = sum(self.mix_tokens)
        w, mix = self.weights, self.mix_tokens
        best, best_gap = members[0], w[members[0]] * total - mix[members[0]]
        for i in members[1:]:
            gap = w[i] * total - mix[i]
            if gap > best_gap:
                best, best_gap = i, gap
        return best

    def _current(self, s: int) -> tuple[int, int]:
        """(document id, length) of source `s`'s current document."""
        pos, ahead = self.position[s], self._ahead[s]
        if ahead is None or ahead[0] != self.epoch[s] or not 0 <= pos - ahead[1] < len(ahead[2]):
            ahead = self._fill(s)
        i = pos - ahead[1]
        return ahead[2][i], ahead[3][i]

    def _fill(self, s: int) -> tuple[int, int, list[int], list[int]]:
        count = len(self._lengths[s])
        pos = self.position[s]
        ids = self.order(s, self.epoch[s])(np.arange(pos, min(pos + self.CHUNK, count)))
        lengths = self._lengths[s][ids]
        if self._held_sorted is not None:
            lengths[_members(self._held_sorted[s], ids)] = 0  # passed over by `plan`
        self._ahead[s] = (self.epoch[s], pos, ids.tolist(), lengths.tolist())
        return self._ahead[s]

    def _next_document(self, s: int) -> None:
        self.offset[s] = 0
        self.position[s] += 1
        if self.position[s] == len(self._lengths[s]):
            self.position[s] = 0
            self.epoch[s] += 1

    def order(self, s: int, epoch: int) -> DocumentPermutation:
        """Document order of source `s` in `epoch`: position -> document id."""
        key = permutation_key(self.seed, self.names[s], epoch)
        return DocumentPermutation(len(self._lengths[s]), key)

    def state_dict(self) -> dict[str, Any]:
        """Plain ints and floats (JSON-able), independent of rank, batch size and seq_len."""
        state = {
            "version": STATE_VERSION,
            "seed": self.seed,
            "samples": self.samples,
            "sources": {
                name: {
                    "epoch": self.epoch[i],
                    "position": self.position[i],
                    "offset": self.offset[i],
                    "tokens": self.tokens[i],
                    "documents": len(self._lengths[i]),
                }
                for i, name in enumerate(self.names)
            },
            "mixture": {
                "weights": dict(zip(self.names, self.weights)),
                "tokens": dict(zip(self.names, self.mix_tokens)),
            },
        }
        if self._held_out is not None:  # absent without a split: the state is as before splits
            state["validation"] = {name: len(h) for name, h in zip(self.names, self._held_out)}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where the stream that saved `state` stopped.

        Sources new to this run start at their first epoch. When the mixture changed (sources
        or weights), its balance restarts from here, so the new weights hold from now on.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"the data loader state has version {state.get('version')!r}, this "
                             f"loader reads version {STATE_VERSION}; it cannot resume from it")
        if state["seed"] != self.seed:
            raise ValueError(f"cannot resume the data loader: saved seed={state['seed']} but this "
                             f"run has {self.seed}; train.seed must match the run that saved it")
        saved = state["sources"]
        self._reset()
        for i, name in enumerate(self.names):
            if name not in saved:
                log.info("data source %r is new: it starts at its first epoch", name)
                continue
            entry, count = saved[name], len(self._lengths[i])
            if entry["documents"] != count:
                raise ValueError(
                    f"data source {name!r} holds {count} documents but the checkpoint's loader "
                    f"state has {entry['documents']}: the data changed since it was saved")
            self.epoch[i], self.position[i] = int(entry["epoch"]), int(entry["position"])
            self.offset[i], self.tokens[i] = int(entry["offset"]), int(entry["tokens"])
            if self.epoch[i] < 0 or not 0 <= self.position[i] < count or self.offset[i] < 0:
                raise ValueError(f"invalid data loader state for source {name!r}: {entry}")
            self._check_held_out(i, state.get("validation", {}).get(name, 0))
            if not self.offset[i] < max(1, self._current(i)[1]):
                raise ValueError(f"invalid data loader state for source {name!r}: {entry}")
        dropped = sorted(set(saved) - set(self.names))
        if dropped:
            log.warning("data sources %s of the checkpoint are not in this run's data config",
                        dropped)
        mixture = state["mixture"]
        if mixture["weights"] == dict(zip(self.names, self.weights)):
            self.mix_tokens = [int(mixture["tokens"][n]) for n in self.names]
        else:
            log.info("the data mixture changed since the checkpoint: it balances from here")
        self.samples = int(state["samples"])

    def _check_held_out(self, s: int, saved: int) -> None:
        """After loading source `s`'s place: warn about documents held out now but not by the
        checkpoint's stream (`saved` held out there) that it already trained on, and move past
        the current document if it is one of them and was cut (its rest is held out now)."""
        held = 0 if self._held_out is None else len(self._held_out[s])
        name = self.names[s]
        if held < saved:
            log.info("data source %r: %d documents return from the validation split to training "
                     "(data.val_docs lowered or 0)", name, saved - held)
        if held <= saved:
            return
        new = self._held_out[s][saved:]  # the first `saved` are the checkpoint's (same order)
        if self.epoch[s] > 0:
            trained = len(new)
        else:
            at = self.order(s, 0).inverse(new)
            trained = int(np.sum(at < self.position[s]))
            trained += int(self.offset[s] > 0 and np.any(at == self.position[s]))
        if trained:
            log.warning("data source %r: %d of the %d documents newly held out for validation "
                        "(data.val_docs) were trained on before this checkpoint; val_loss includes "
                        "them", name, trained, len(new))
        if self.offset[s] and self._current(s)[1] == 0:
            self._next_document(s)


def _members(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Bool mask like `ids`: which of `ids` occur in the sorted array `sorted_ids`."""
    if not len(sorted_ids):
        return np.zeros(np.shape(ids), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return sorted_ids[at] == ids
