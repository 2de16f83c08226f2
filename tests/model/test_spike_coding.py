"""Spike coding: exact round trips, step counts, statistics on hand-computed inputs."""

import pytest
import torch

from model.spike_coding import (CODINGS, all_spike_stats, count_histogram, decode, encode,
                                spike_stats, steps_needed)

SIGNED = ("ternary", "bitwise", "twos_complement")
EDGE = [0, 1, -1, 2, -2, 3, 5, -5, 7, -8, 8, 1000, -1000, 2 ** 15 - 1, -(2 ** 15 - 1), -(2 ** 15)]


def _allowed(coding):
    return {"binary": {0, 1}, "ternary": {-1, 0, 1}, "bitwise": {-1, 0, 1},
            "twos_complement": {0, 1}}[coding]


def _roundtrip(s, coding, steps=None):
    train = encode(s, coding, steps)
    assert train.dtype == torch.int8
    assert train.shape[1:] == s.shape
    assert set(train.unique().tolist()) <= _allowed(coding)
    out = decode(train, coding)
    assert out.dtype == torch.int64
    assert torch.equal(out, s.to(torch.int64)), coding
    return train


@pytest.mark.parametrize("coding", CODINGS)
def test_roundtrip_edge_values(coding):
    vals = [v for v in EDGE if coding != "binary" or v >= 0]
    s = torch.tensor(vals)
    train = _roundtrip(s, coding)
    assert train.shape[0] == steps_needed(s, coding)
    # every value alone, so each gets its own (minimal) train length too
    for v in vals:
        _roundtrip(torch.tensor([v]), coding)


@pytest.mark.parametrize("coding", CODINGS)
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 5), (2, 3, 4)])
@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64])
def test_roundtrip_shapes_and_dtypes(coding, shape, dtype):
    g = torch.Generator().manual_seed(hash((coding, shape)) % 1000)
    s = torch.randint(-100, 101, shape, generator=g).to(dtype)
    if coding == "binary":
        s = s.abs()
    _roundtrip(s, coding)


@pytest.mark.parametrize("coding", ("bitwise", "twos_complement"))
def test_roundtrip_huge_counts(coding):
    # Beyond 2^24 the bit-length takes the exact integer path; up to the int64 edge.
    s = torch.tensor([2 ** 24 - 1, 2 ** 24, 2 ** 24 + 1, 2 ** 40 + 3, -(2 ** 53 + 1),
                      2 ** 62, 2 ** 63 - 1, -(2 ** 63 - 1), 0, -1])
    _roundtrip(s, coding)
    assert steps_needed(s, coding) == (63 if coding == "bitwise" else 64)
    # steps beyond 64 (sign extension / zero padding) still decode
    _roundtrip(s, coding, steps=70)


@pytest.mark.parametrize("coding", CODINGS)
def test_given_steps(coding):
    s = torch.tensor([[0, 3], [5, 1]])
    need = steps_needed(s, coding)
    train = _roundtrip(s, coding, steps=need + 4)
    assert train.shape[0] == need + 4
    if coding != "twos_complement":
        assert not train[need:].any()  # padding steps are silent
    with pytest.raises(ValueError, match="too small"):
        encode(s, coding, steps=need - 1)


def test_all_zero_and_empty():
    z = torch.zeros(4, 3, dtype=torch.int32)
    for c in CODINGS:
        assert steps_needed(z, c) == 0
        assert encode(z, c).shape == (0, 4, 3)
        assert torch.equal(decode(encode(z, c), c), z.long())
        assert steps_needed(torch.zeros(0, dtype=torch.int64), c) == 0


def test_binary_refuses_negatives():
    msg = "binary coding cannot represent negative counts; use ternary or bitwise"
    s = torch.tensor([3, -1, 0])
    for fn in (lambda: encode(s, "binary"), lambda: steps_needed(s, "binary"),
               lambda: spike_stats(s, "binary")):
        with pytest.raises(ValueError, match=msg):
            fn()


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown spike coding"):
        encode(torch.tensor([1]), "unary")
    with pytest.raises(TypeError):
        encode(torch.tensor([1.0]), "ternary")
    with pytest.raises(ValueError, match="values"):
        decode(torch.tensor([[2]], dtype=torch.int8), "binary")
    with pytest.raises(ValueError, match="values"):
        decode(torch.tensor([[-1]], dtype=torch.int8), "twos_complement")


def test_known_step_counts():
    s = torch.tensor(5)
    assert steps_needed(s, "binary") == 5
    assert steps_needed(s, "ternary") == 5
    assert steps_needed(s, "bitwise") == 3
    assert steps_needed(s, "twos_complement") == 4  # 0101
    s = torch.tensor([0, 1, -1, 5, -5, -8, 8, 1000])
    assert steps_needed(s, "ternary", per_element=True).tolist() == [0, 1, 1, 5, 5, 8, 8, 1000]
    assert steps_needed(s, "bitwise", per_element=True).tolist() == [0, 1, 1, 3, 3, 4, 4, 10]
    tc = steps_needed(s, "twos_complement", per_element=True)
    assert tc.tolist() == [0, 2, 1, 4, 4, 4, 5, 11]
    for c in SIGNED:
        assert steps_needed(s, c) == int(steps_needed(s, c, per_element=True).max())


def test_known_trains():
    s = torch.tensor([5, -5, 0])
    assert encode(s, "ternary").T.tolist() == [
        [1, 1, 1, 1, 1], [-1, -1, -1, -1, -1], [0, 0, 0, 0, 0]]
    assert encode(torch.tensor([3, 0, 1]), "binary").T.tolist() == [[1, 1, 1], [0, 0, 0], [1, 0, 0]]
    # bitwise is LSB first: 5 = 101b, 6 = 110b
    assert encode(torch.tensor([5, -6]), "bitwise").T.tolist() == [[1, 0, 1], [0, -1, -1]]
    # two's complement, LSB first, B = 4: 5 = 0101, -5 = 1011, -1 = 1111
    assert encode(torch.tensor([5, -5, -1]), "twos_complement").T.tolist() == [
        [1, 0, 1, 0], [1, 1, 0, 1], [1, 1, 1, 1]]


def test_stats_hand_computed():
    s = torch.tensor([0, 1, 5, 0, -3, 2])  # N = 6, 2 silent
    st = spike_stats(s, "ternary", window=3)
    assert st["steps_max"] == 5 and st["steps_mean"] == pytest.approx(11 / 6)
    assert st["spikes_total"] == 11 and st["spikes_per_channel"] == pytest.approx(11 / 6)
    assert st["firing_rate"] == pytest.approx(11 / (6 * 5))
    # first 3 steps: min(|s|, 3) = 0,1,3,0,3,2 -> 9 spikes of 18 entries
    assert st["sparsity"] == pytest.approx(1 - 9 / 18)
    assert st["silent_share"] == pytest.approx(2 / 6)
    assert st["histogram"] == {"values": [-3, 0, 1, 2, 5], "counts": [1, 2, 1, 1, 1]}

    st = spike_stats(s, "bitwise", window=2)
    # |s| bits: 0, 1, 101, 0, 11, 10 -> steps 0,1,3,0,2,2; spikes 0,1,2,0,2,1
    assert st["steps_max"] == 3 and st["steps_mean"] == pytest.approx(8 / 6)
    assert st["spikes_total"] == 6
    assert st["firing_rate"] == pytest.approx(6 / 18)
    # low 2 bits: 00, 01, 01, 00, 11, 10 -> 5 spikes of 12 entries
    assert st["sparsity"] == pytest.approx(1 - 5 / 12)

    st = spike_stats(s, "twos_complement", window=3)
    # B = 4: 0000, 1000, 1010, 0000, 1011 (-3 = 1101 LSB-first 1,0,1,1), 0100 (LSB first)
    assert st["steps_max"] == 4
    assert st["spikes_total"] == 0 + 1 + 2 + 0 + 3 + 1
    assert st["sparsity"] == pytest.approx(1 - (0 + 1 + 2 + 0 + 2 + 1) / 18)

    st = spike_stats(torch.tensor([0, 4, 1, 0]), "binary", window=3)
    assert st["firing_rate"] == pytest.approx(5 / 16)
    assert st["sparsity"] == pytest.approx(1 - 4 / 12)
    assert st["silent_share"] == 0.5

    # window longer than the train: the missing steps count as zeros
    st = spike_stats(torch.tensor([1, 0]), "bitwise", window=3)
    assert st["sparsity"] == pytest.approx(1 - 1 / 6)


@pytest.mark.parametrize("coding", CODINGS)
@pytest.mark.parametrize("window", [1, 3, 8])
def test_stats_match_materialised_train(coding, window):
    g = torch.Generator().manual_seed(window)
    s = torch.round(torch.randn(37, 11, generator=g) * 6).long()
    if coding == "binary":
        s = s.abs()
    st = spike_stats(s, coding, window=window)
    train = encode(s, coding)
    T, n = train.shape[0], s.numel()
    nz = train != 0
    assert st["steps_max"] == T
    assert st["spikes_total"] == int(nz.sum())
    assert st["firing_rate"] == pytest.approx(int(nz.sum()) / (n * T))
    padded = torch.zeros((max(window, T),) + s.shape, dtype=torch.bool)
    padded[:T] = nz
    assert st["sparsity"] == pytest.approx(1 - float(padded[:window].float().mean()))
    assert st["silent_share"] == pytest.approx(float((s == 0).float().mean()))
    # per-element steps: the last nonzero step + 1 (0 for silent), except the two's complement
    # width, which counts the sign bit
    if coding != "twos_complement":
        idx = torch.arange(1, T + 1).view(T, 1, 1)
        assert torch.equal((nz * idx).amax(0), steps_needed(s, coding, per_element=True))
        assert st["steps_mean"] == pytest.approx(float((nz * idx).amax(0).double().mean()))


def test_histogram_fixed_range():
    s = torch.tensor([-9, -2, 0, 0, 1, 7, 8, 100])
    h = count_histogram(s, value_range=(-7, 7))
    assert h["values"] == list(range(-7, 8))
    assert h["underflow"] == 1 and h["overflow"] == 2
    assert sum(h["counts"]) == 5 and h["counts"][7] == 2
    assert spike_stats(s, "ternary", hist_range=(-7, 7))["histogram"] == h
    # wide range takes the sort-based path
    w = torch.tensor([-(2 ** 40), 3, 3, 2 ** 40])
    assert count_histogram(w) == {"values": [-(2 ** 40), 3, 2 ** 40], "counts": [1, 2, 1]}


def test_all_spike_stats_skips_binary_on_negatives():
    out = all_spike_stats(torch.tensor([1, -2, 0]))
    assert out["binary"] is None
    assert set(out) == set(CODINGS) and out["ternary"]["spikes_total"] == 3
    assert all(v is not None for v in all_spike_stats(torch.tensor([1, 2])).values())


def test_bitwise_far_fewer_steps_than_binary():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        s = torch.randint(0, 2 ** 15, (64,), generator=g)
        big = s >= 16
        b = steps_needed(s, "binary", per_element=True)
        w = steps_needed(s, "bitwise", per_element=True)
        assert (w <= b).all()
        assert (w[big] * 3 < b[big]).all()  # log2(s) + 1 vs s
        assert steps_needed(s, "bitwise") <= 15 and steps_needed(s, "binary") >= 16
        assert spike_stats(s, "bitwise")["steps_mean"] * 50 < spike_stats(s, "binary")["steps_mean"]


def test_large_tensor_stats_cover_every_element():
    """A layer-sized tensor (4096 x 3584) goes through every signed coding; the counts of the
    histogram add up to every element (speed is a benchmark matter, not asserted here)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 3584, generator=g)
    s = torch.round(x / (x.abs().mean(-1, keepdim=True) / 3)).to(torch.int32)
    for c in SIGNED:
        st = spike_stats(s, c)
        assert st["numel"] == s.numel() == sum(st["histogram"]["counts"])
