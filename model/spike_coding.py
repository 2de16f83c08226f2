"""Spike coding: integer spike counts <-> spike trains over virtual time steps.

The adaptive-threshold spiking op turns activations into integer counts ``s`` (any shape ``[...]``).
For event-driven hardware each count is expanded into a spike train with a leading time axis
``[T, ...]``. Four codings are supported (SpikingBrain report, "Spiking"):

``binary``            values {0, 1}; s >= 0 -> s ones in steps 0..s-1, then zeros. Unsigned only.
``ternary``           values {-1, 0, 1}; |s| steps of sign(s), then zeros.
``bitwise``           bidirectional bitwise ("bitwise-ternary"): step t carries bit t of |s|,
                      **LSB first**, as sign(s) * bit in {-1, 0, 1}; decode = sum_t v_t * 2^t.
``twos_complement``   step t carries bit t (**LSB first**) of the B-bit two's-complement
                      representation of s as {0, 1}, B = T (number of steps); decoding weights the
                      top bit -2^(B-1). Steps beyond the minimal width are sign extension.

Conventions
- Counts are any integer dtype; they are handled as int64 (|s| < 2^63). Trains are int8, decoded
  counts int64.
- ``steps_needed`` for a count of 0 is 0 in every coding (a silent channel emits nothing). For
  two's complement a nonzero s needs the smallest B with -2^(B-1) <= s <= 2^(B-1) - 1 (5 -> 4 bits
  ``0101``, -1 -> 1 bit, -8 -> 4 bits). A train of 0 steps decodes to 0.
- ``encode`` uses T = max steps needed over the tensor unless ``steps`` is given (must be >= that).
- LSB first was chosen so that a fixed step window (the report's 3 steps) sees the low bits, which
  is where the small counts that dominate the distribution live, and so a shorter window is a
  prefix of a longer one.

Everything is vectorised: per-element work is tensor ops; the only Python loops run over time
steps (bit positions) for the bit codings, never over elements.
"""
from __future__ import annotations

import torch

CODINGS = ("binary", "ternary", "bitwise", "twos_complement")
_ALIASES = {
    "bidirectional": "bitwise",
    "bitwise_ternary": "bitwise",
    "bitwise-ternary": "bitwise",
    "twos": "twos_complement",
    "twos-complement": "twos_complement",
}
_BINARY_NEG_MSG = "binary coding cannot represent negative counts; use ternary or bitwise"
_INT64_MIN = -(2 ** 63)
_INT64_MAX = 2 ** 63 - 1
# float32 holds every integer below this exactly, so frexp gives an exact bit length.
_SAFE_F32 = 2 ** 24


def _coding(coding: str) -> str:
    c = _ALIASES.get(coding, coding)
    if c not in CODINGS:
        raise ValueError(f"unknown spike coding {coding!r}; expected one of {CODINGS}")
    return c


def _as_counts(counts) -> torch.Tensor:
    """Integer tensor [...] -> int64 tensor [...] (rejects floats and bools)."""
    counts = torch.as_tensor(counts)
    if counts.dtype == torch.bool or counts.is_floating_point() or counts.is_complex():
        raise TypeError(f"spike counts must be an integer tensor, got {counts.dtype}")
    return counts.to(torch.int64)


def _minmax(s: torch.Tensor) -> tuple[int, int]:
    """(min, max) of an int64 tensor as Python ints; (0, 0) for an empty tensor."""
    if s.numel() == 0:
        return 0, 0
    lo, hi = torch.aminmax(s)
    lo, hi = int(lo), int(hi)
    # |INT64_MIN| does not fit int64, so abs()/negation would silently wrap.
    if lo == _INT64_MIN:
        raise ValueError("spike count -2^63 is out of range (|s| must fit int64)")
    return lo, hi


def _check_binary(lo: int) -> None:
    if lo < 0:
        raise ValueError(f"{_BINARY_NEG_MSG} (min count {lo})")


def _bit_length(a: torch.Tensor, amax: int) -> torch.Tensor:
    """Bit length of non-negative int64 a [...] (0 -> 0, 5 -> 3), int64 [...].

    ``amax`` is max(a); below 2^24 float32 frexp is exact and is the cheapest (2 passes);
    otherwise a 6-step binary search on integer shifts stays exact for the whole int64 range.
    """
    if amax < _SAFE_F32:
        return torch.frexp(a.to(torch.float32)).exponent.to(torch.int64)
    n = torch.zeros_like(a)
    for shift in (32, 16, 8, 4, 2, 1):
        big = (a >> shift) != 0
        n += big * shift
        a = torch.where(big, a >> shift, a)
    return n + (a != 0)


def _tc_width_scalar(v: int) -> int:
    """Minimal two's-complement width of one Python int (0 -> 0)."""
    if v == 0:
        return 0
    return (v if v > 0 else -v - 1).bit_length() + 1


def _popcount(x: torch.Tensor) -> torch.Tensor:
    """Number of set bits of each int64 element (two's-complement pattern for negatives)."""
    # SWAR popcount: a dozen whole-tensor ops regardless of the bit width, instead of one pass
    # per bit. Runs on the low 63 bits (non-negative, so >> is a logical shift); the sign bit is
    # added separately.
    neg = x < 0
    x = x & _INT64_MAX
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    x = x + (x >> 8)
    x = x + (x >> 16)
    x = x + (x >> 32)
    return (x & 0x7F) + neg


def _low_mask(bits: int) -> int:
    """Mask of the low ``bits`` bits as a value usable with int64 tensors (bits >= 64: all)."""
    return -1 if bits >= 64 else (1 << bits) - 1


# --------------------------------------------------------------------------- steps


def steps_needed(counts, coding: str, per_element: bool = False):
    """Time steps needed to encode ``counts`` [...] under ``coding``.

    Returns the max over the tensor as an int (0 for an empty or all-zero tensor), or with
    ``per_element=True`` an int64 tensor [...] of each element's own need.
    """
    c = _coding(coding)
    s = _as_counts(counts)
    lo, hi = _minmax(s)
    if c == "binary":
        _check_binary(lo)
    if not per_element:
        # The max only depends on the extremes: every step function is monotone in |s|
        # (and, for two's complement, in s on each side of 0).
        if c == "binary":
            return hi
        amax = max(-lo, hi)
        if c == "ternary":
            return amax
        if c == "bitwise":
            return amax.bit_length()
        return max(_tc_width_scalar(lo), _tc_width_scalar(hi))
    if c == "binary":
        return s.clone()
    if c == "ternary":
        return s.abs()
    if c == "bitwise":
        return _bit_length(s.abs(), max(-lo, hi))
    # s ^ (s >> 63) is s for s >= 0 and -s-1 (= ~s) for s < 0: the magnitude that sets the width.
    m = s ^ (s >> 63)
    return torch.where(s == 0, 0, _bit_length(m, max(-lo - 1, hi, 0)) + 1)


def _resolve_steps(needed: int, steps: int | None, coding: str) -> int:
    if steps is None:
        return needed
    steps = int(steps)
    if steps < needed:
        raise ValueError(
            f"steps={steps} is too small for {coding} coding of these counts: {needed} needed")
    return steps


# --------------------------------------------------------------------------- encode / decode


def encode(counts, coding: str, steps: int | None = None) -> torch.Tensor:
    """Integer counts [...] -> spike train [T, ...] (int8).

    T = ``steps_needed(counts, coding)`` unless ``steps`` is given (ValueError if smaller).
    Extra steps are zeros, except in two's complement where they are sign extension (B = T).
    """
    c = _coding(coding)
    s = _as_counts(counts)
    needed = steps_needed(s, c)
    T = _resolve_steps(needed, steps, c)
    out_shape = (T, *s.shape)
    if c in ("binary", "ternary"):
        # Comparing a [T, 1, ...] step index with the counts gives a bool train straight away
        # (1 byte per entry, no int64 [T, ...] intermediate); fine even for T in the thousands.
        t = torch.arange(T, dtype=torch.int64).view(T, *([1] * s.dim()))
        active = t < s.abs()
        if c == "binary":
            return active.to(torch.int8)
        return active.to(torch.int8) * torch.sign(s).to(torch.int8)
    train = torch.empty(out_shape, dtype=torch.int8)
    if c == "bitwise":
        a = s.abs()
        sign = torch.sign(s).to(torch.int8)
        # One pass per bit keeps the intermediates at [...] instead of int64 [T, ...].
        for t in range(T):
            # Bits >= 63 of a non-negative int64 are 0; clamp the shift to stay defined.
            train[t] = ((a >> min(t, 63)) & 1).to(torch.int8) * sign
        return train
    for t in range(T):
        # Arithmetic >> sign-extends, so steps beyond the width repeat the sign bit.
        train[t] = ((s >> min(t, 63)) & 1).to(torch.int8)
    return train


_VALUE_RANGE = {"binary": (0, 1), "ternary": (-1, 1), "bitwise": (-1, 1), "twos_complement": (0, 1)}


def decode(train, coding: str, validate: bool = True) -> torch.Tensor:
    """Spike train [T, ...] -> integer counts [...] (int64); exact inverse of ``encode``.

    ``validate`` checks that the train only holds the coding's spike values.
    """
    c = _coding(coding)
    train = torch.as_tensor(train)
    if train.dim() < 1:
        raise ValueError("a spike train needs a leading time axis [T, ...]")
    T = train.shape[0]
    if validate and train.numel():
        lo, hi = (int(v) for v in torch.aminmax(train))
        vlo, vhi = _VALUE_RANGE[c]
        if lo < vlo or hi > vhi:
            raise ValueError(
                f"{c} spike trains hold values in [{vlo}, {vhi}], found [{lo}, {hi}]")
    if c in ("binary", "ternary"):
        # Summing int8 steps into a narrow accumulator is several times faster than an int64
        # reduction on CPU; |count| <= T, so int16 is exact while T < 2^15.
        if T < 2 ** 15:
            acc = torch.zeros(train.shape[1:], dtype=torch.int16)
            for t in range(T):
                acc += train[t]
            return acc.to(torch.int64)
        return train.sum(0, dtype=torch.int64)
    acc = torch.zeros(train.shape[1:], dtype=torch.int64)
    if c == "bitwise":
        for t in range(T):
            if t >= 63:
                # 2^63 and up do not fit int64: valid trains of int64 counts are zero there.
                if train[t:].any():
                    raise ValueError(
                        "bitwise train has spikes at step >= 63 (count overflows int64)")
                break
            acc += train[t].to(torch.int64) << t
        return acc
    if T == 0:
        return acc
    if T > 64:
        # Steps past 64 can only be sign extension of an int64 count: check, then drop them.
        if (train[63:] != train[T - 1]).any():
            raise ValueError("two's-complement train wider than 64 bits is not a sign extension")
        train, T = train[:64], 64
    for t in range(T - 1):
        acc += train[t].to(torch.int64) << t
    # The top bit carries weight -2^(B-1) (fits int64 for B <= 64).
    acc += train[T - 1].to(torch.int64) * (-(1 << (T - 1)))
    return acc


# --------------------------------------------------------------------------- statistics


def _value_freq(s: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct values of int64 s [...] and their frequencies, both int64 [V], sorted."""
    s = s.reshape(-1)
    if s.numel() == 0:
        return s.new_empty(0), s.new_empty(0)
    if hi - lo < 2 ** 22:
        # bincount is one linear pass; unique() would sort the whole tensor.
        freq = torch.bincount(s - lo, minlength=hi - lo + 1)
        present = torch.nonzero(freq).squeeze(1)
        return present + lo, freq[present]
    return torch.unique(s, return_counts=True)


def _histogram(values: torch.Tensor, freq: torch.Tensor, value_range) -> dict:
    if value_range is None:
        return {"values": values.tolist(), "counts": freq.tolist()}
    lo, hi = int(value_range[0]), int(value_range[1])
    if hi < lo:
        raise ValueError(f"value_range {value_range} is empty")
    inside = (values >= lo) & (values <= hi)
    bins = torch.zeros(hi - lo + 1, dtype=torch.int64)
    bins.index_add_(0, values[inside] - lo, freq[inside])
    return {"values": list(range(lo, hi + 1)), "counts": bins.tolist(),
            "underflow": int(freq[values < lo].sum()), "overflow": int(freq[values > hi].sum())}


def count_histogram(counts, value_range: tuple[int, int] | None = None) -> dict:
    """Histogram of integer counts [...].

    Without ``value_range``: {"values": sorted distinct values, "counts": their frequencies}.
    With ``value_range=(lo, hi)``: one bin per value lo..hi plus "underflow" (< lo) and
    "overflow" (> hi) counts, so histograms of different tensors line up.
    Python lists/ints, ready for JSON.
    """
    s = _as_counts(counts)
    return _histogram(*_value_freq(s, *_minmax(s)), value_range)


def _spikes(s: torch.Tensor, c: str, bits: int) -> torch.Tensor:
    """Per-element number of nonzero train entries within the first ``bits`` steps, int64 [...].

    For two's complement ``bits`` must already be capped at the train width B.
    """
    if c in ("binary", "ternary"):
        return s.abs().clamp(max=bits)
    if c == "bitwise":
        return _popcount(s.abs() & _low_mask(bits))
    return _popcount(s & _low_mask(bits))


def spike_stats(counts, coding: str, window: int = 3,
                hist_range: tuple[int, int] | None = None) -> dict:
    """Statistics of integer counts [...] (N = numel channels) expanded under ``coding``.

    Computed from the counts' value histogram, without materialising the [T, ...] train.
    Returns a JSON-ready dict:

    - ``steps_max``: T = steps needed for the tensor (the train length); ``steps_mean``: mean of
      each element's own steps needed.
    - ``spikes_total``, ``spikes_per_channel``: nonzero train entries (a -1 spike counts as one),
      total and per element.
    - ``firing_rate``: spikes per channel per step over the needed steps,
      spikes_total / (N * steps_max) (0 when steps_max == 0).
    - ``sparsity``: fraction of zero entries in the first ``window`` steps of the train, steps past
      T counting as zeros (the report uses window = 3).
    - ``silent_share``: fraction of channels with count 0.
    - ``histogram``: ``count_histogram(counts, hist_range)``.

    Binary coding raises ValueError on negative counts. Ratios over an empty tensor are NaN.
    """
    s = _as_counts(counts)
    # Every statistic is a function of the count value, so work on the distinct values weighted
    # by their frequency: one bincount pass over the tensor, the rest is on a few hundred values.
    return spike_stats_from_histogram(*_value_freq(s, *_minmax(s)), coding, window, hist_range)


def spike_stats_from_histogram(values, freq, coding: str, window: int = 3,
                               hist_range: tuple[int, int] | None = None) -> dict:
    """``spike_stats`` of counts given as a histogram: distinct integer ``values`` [V] occurring
    ``freq`` [V] times (non-negative integers; zero frequencies are ignored and repeated values
    summed, so dense or merged histograms can be passed as they are). Same result as
    ``spike_stats`` on the tensor holding each value that many times."""
    c = _coding(coding)
    window = int(window)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    values, freq = _as_counts(values).reshape(-1), _as_counts(freq).reshape(-1)
    if values.shape != freq.shape:
        raise ValueError(f"values {tuple(values.shape)} and freq {tuple(freq.shape)} differ in shape")
    if freq.numel() and int(freq.min()) < 0:
        raise ValueError("histogram frequencies must be >= 0")
    present = freq > 0
    # Sorted distinct values, as from a tensor: duplicates (e.g. merged histograms) are summed.
    values, inverse = torch.unique(values[present], return_inverse=True)
    freq = torch.zeros_like(values).index_add_(0, inverse, freq[present])
    lo, _ = _minmax(values)
    if c == "binary":
        _check_binary(lo)
    n = int(freq.sum())
    T = steps_needed(values, c)
    steps = steps_needed(values, c, per_element=True)
    # For two's complement every element is written with B = T bits (sign-extended), so spikes
    # are counted over the low T bits; in the other codings steps past an element's need are 0.
    bits_all = T if c == "twos_complement" else max(T, 1)
    spikes_total = int((_spikes(values, c, bits_all) * freq).sum())
    win_bits = min(window, T) if c == "twos_complement" else window
    spikes_window = int((_spikes(values, c, win_bits) * freq).sum())
    silent = int(freq[values == 0].sum())
    nan = float("nan")
    return {
        "coding": c,
        "numel": n,
        "window": window,
        "steps_max": T,
        "steps_mean": int((steps * freq).sum()) / n if n else nan,
        "spikes_total": spikes_total,
        "spikes_per_channel": spikes_total / n if n else nan,
        "firing_rate": (spikes_total / (n * T) if T else 0.0) if n else nan,
        "sparsity": 1.0 - spikes_window / (n * window) if n else nan,
        "silent_share": silent / n if n else nan,
        "histogram": _histogram(values, freq, hist_range),
    }


def all_spike_stats(counts, window: int = 3, hist_range: tuple[int, int] | None = None) -> dict:
    """``spike_stats`` for every coding, {coding: stats}; binary is skipped (None) when the
    counts hold negatives, since it cannot represent them."""
    s = _as_counts(counts)
    out = {}
    for c in CODINGS:
        if c == "binary" and s.numel() and int(s.min()) < 0:
            out[c] = None
            continue
        out[c] = spike_stats(s, c, window, hist_range)
    return out


__all__ = ["CODINGS", "steps_needed", "encode", "decode", "spike_stats",
           "spike_stats_from_histogram", "all_spike_stats", "count_histogram"]
