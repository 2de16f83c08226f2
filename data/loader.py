"""Deterministic, resumable loader of packed samples for data-parallel training.

There is one global sample order: epoch `e` is a permutation of all sample indices drawn from
a generator seeded with (seed, e) only. Step `s` consumes the global samples
`[s*G, (s+1)*G)` of the concatenated epochs (G = global batch), rolling into the next epoch's
permutation when one is exhausted; data-parallel rank `r` takes the contiguous slice
`[r*b, (r+1)*b)` of those, b = G / dp_size. The state is the count of consumed global samples,
so a run can resume with a different data-parallel size and see the same global batches.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .config import DataConfig
from .packing import num_samples, pack_samples
from .sources import prepare
from .token_data import TokenData
from .tokenizer import Tokenizer

# Separates the sample-order stream from any other randomness derived from the same seed.
_ORDER_STREAM = 0xDA7A


class Loader:
    """Batches `{"input_ids", "labels", "position_ids"}`, each int64 `[b, L]`, for one DP rank.

    `data` is the prepared token stream; by default it is prepared from `cfg` (`cfg.name`).
    """

    def __init__(
        self,
        cfg: DataConfig,
        *,
        seed: int,
        global_batch: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        data: TokenData | None = None,
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
            raise ValueError(
                f"train.global_batch={global_batch} must be divisible by the data-parallel "
                f"size {dp_size}"
            )
        if data is None:
            data = prepare(cfg)
        self.cfg = cfg
        self.seed = seed
        self.global_batch = global_batch
        self.local_batch = global_batch // dp_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.data = data
        self.num_samples = num_samples(len(data.tokens), cfg.seq_len)
        if self.num_samples == 0:
            raise ValueError(
                f"the {cfg.name!r} data holds {len(data.tokens)} tokens, not enough for one "
                f"sample of data.seq_len={cfg.seq_len}: lower data.seq_len or add data"
            )
        self._consumed = 0  # global samples consumed over all epochs
        self._orders: dict[int, np.ndarray] = {}

    @property
    def tokenizer(self) -> Tokenizer:
        return self.data.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.data.tokenizer.vocab_size

    @property
    def eos_id(self) -> int:
        return self.data.tokenizer.eos_id

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one global batch (all ranks)."""
        return self.global_batch * self.cfg.seq_len

    @property
    def epoch(self) -> int:
        return self._consumed // self.num_samples

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's share of the next global batch; advances by one global batch."""
        start = self._consumed + self.dp_rank * self.local_batch
        ids = self._sample_ids(start, self.local_batch)
        self._consumed += self.global_batch
        arrays = pack_samples(self.data.tokens, ids, self.cfg.seq_len, self.eos_id)
        return {k: torch.from_numpy(v) for k, v in arrays.items()}

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """Where the global sample order stands; independent of rank and data-parallel size."""
        epoch, position = divmod(self._consumed, self.num_samples)
        return {
            "epoch": epoch,
            "position": position,
            "seed": self.seed,
            "seq_len": self.cfg.seq_len,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the loader that saved `state` stopped."""
        for key, mine, setting in (
            ("seed", self.seed, "train.seed"),
            ("seq_len", self.cfg.seq_len, "data.seq_len"),
            ("num_samples", self.num_samples, "the data (data.name and its settings)"),
        ):
            if key in state and state[key] != mine:
                raise ValueError(
                    f"cannot resume the data loader: saved {key}={state[key]} but this run has "
                    f"{mine}; {setting} must match the run that saved it"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.num_samples:
            raise ValueError(f"invalid data loader state: epoch={epoch}, position={position}")
        self._consumed = epoch * self.num_samples + position

    def _sample_ids(self, start: int, count: int) -> np.ndarray:
        """Global order entries `[start, start+count)`, crossing epochs as needed."""
        parts = []
        while count:
            epoch, position = divmod(start, self.num_samples)
            take = min(count, self.num_samples - position)
            parts.append(self._order(epoch)[position : position + take])
            start += take
            count -= take
        return np.concatenate(parts)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # the order only moves forward: drop the oldest epoch
                del self._orders[min(self._orders)]
            rng = np.random.default_rng([self.seed, epoch, _ORDER_STREAM])
            self._orders[epoch] = rng.permutation(self.num_samples)
        return self._orders[epoch]
