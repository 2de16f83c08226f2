"""Keyed pseudo-random permutations of `0 .. n-1` in O(1) memory (Feistel network, cycle walking).

The loader visits a source's documents in a shuffled order per epoch. Corpora hold ~10^8
documents, so the order is never materialised: `DocumentPermutation(n, key)(positions)` maps
positions to document indices directly, vectorised in numpy, for any slice of the epoch.

Construction: a balanced Feistel network on `2h` bits (the smallest even width with
`2^(2h) >= n`) is a bijection of `0 .. 2^(2h)-1` for any round function; values that land
outside `0 .. n-1` are encrypted again ("cycle walking") until they land inside, which keeps it
a bijection of `0 .. n-1`. Since `2^(2h) < 4n`, a value needs fewer than 4 encryptions on average.
"""

from __future__ import annotations

import hashlib

import numpy as np

ROUNDS = 6
_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def permutation_key(seed: int, name: str, epoch: int) -> bytes:
    """Key of the document order of source `name` in `epoch` of a run seeded with `seed`."""
    return hashlib.sha256(f"spikingbrain-order\0{seed}\0{name}\0{epoch}".encode()).digest()


class DocumentPermutation:
    """A bijection of `0 .. n-1` chosen by `key` (bytes; e.g. `permutation_key(...)`)."""

    def __init__(self, n: int, key: bytes) -> None:
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = int(n)
        half = max(1, ((self.n - 1).bit_length() + 1) // 2)
        self._shift = np.uint64(half)
        self._mask = np.uint64((1 << half) - 1)
        words = hashlib.sha512(key).digest()
        self._keys = [np.uint64(int.from_bytes(words[8 * i : 8 * i + 8], "little"))
                      for i in range(ROUNDS)]

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """Documents at `positions` (ints in `[0, n)`, any shape) as int64 of the same shape."""
        x = np.asarray(positions, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"positions must lie in [0, {self.n})")
        y = self._encrypt(x.astype(np.uint64))
        out = np.flatnonzero(y >= self.n)
        while out.size:  # cycle walking: re-encrypt until inside the domain
            y[out] = self._encrypt(y[out])
            out = out[y[out] >= self.n]
        return y.astype(np.int64)

    def inverse(self, documents: np.ndarray) -> np.ndarray:
        """Positions of `documents` (ints in `[0, n)`, any shape): `self(self.inverse(d)) == d`."""
        x = np.asarray(documents, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"documents must lie in [0, {self.n})")
        y = self._decrypt(x.astype(np.uint64))
        out = np.flatnonzero(y >= self.n)
        while out.size:  # walk the cycle backwards: the first value inside the domain
            y[out] = self._decrypt(y[out])
            out = out[y[out] >= self.n]
        return y.astype(np.int64)

    def _decrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._shift, x & self._mask
        for key in reversed(self._keys):
            left, right = right ^ (_mix(left ^ key) & self._mask), left
        return (left << self._shift) | right

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._shift, x & self._mask
        for key in self._keys:
            left, right = right, left ^ (_mix(right ^ key) & self._mask)
        return (left << self._shift) | right


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every output bit depends on every input bit (wrapping uint64)."""
    x = x + _M1
    x = (x ^ (x >> _S30)) * _M2
    x = (x ^ (x >> _S27)) * _M3
    return x ^ (x >> _S31)
