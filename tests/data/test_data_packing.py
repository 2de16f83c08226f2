import numpy as np

from data.packing import IGNORE_INDEX, gather_windows, num_samples, pack_samples, windows_to_batch

EOS = 0
# Documents [11 12 13], [21 22], [31 32 33 34 35], [41], each followed by EOS.
STREAM = np.array([11, 12, 13, 0, 21, 22, 0, 31, 32, 33, 34, 35, 0, 41, 0], dtype=np.uint16)


def test_num_samples():
    assert num_samples(len(STREAM), 4) == 3  # windows need L + 1 tokens
    assert num_samples(len(STREAM), 7) == 2
    assert num_samples(len(STREAM), 14) == 1
    assert num_samples(len(STREAM), 15) == 0
    assert num_samples(0, 4) == 0


def test_windows_overlap_by_one_token():
    w = gather_windows(STREAM, np.array([2, 0]), 4)
    assert w.dtype == np.uint16
    np.testing.assert_array_equal(w, [[32, 33, 34, 35, 0], [11, 12, 13, 0, 21]])


def test_boundaries_positions_and_labels():
    b = pack_samples(STREAM, np.array([0, 1, 2]), 4, EOS)
    assert all(v.dtype == np.int64 and v.shape == (3, 4) for v in b.values())
    x = IGNORE_INDEX
    np.testing.assert_array_equal(b["input_ids"], [[11, 12, 13, 0], [21, 22, 0, 31], [32, 33, 34, 35]])
    np.testing.assert_array_equal(b["labels"], [[12, 13, 0, x], [22, 0, x, 32], [33, 34, 35, 0]])
    # A sample's first token and every token after an EOS start at position 0.
    np.testing.assert_array_equal(b["position_ids"], [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3]])


def test_back_to_back_eos_and_long_window():
    stream = np.array([5, 0, 0, 6, 7, 0, 8], dtype=np.int64)
    b = windows_to_batch(stream[None, :], EOS)
    x = IGNORE_INDEX
    np.testing.assert_array_equal(b["input_ids"], [[5, 0, 0, 6, 7, 0]])
    np.testing.assert_array_equal(b["labels"], [[0, x, x, 7, 0, x]])
    np.testing.assert_array_equal(b["position_ids"], [[0, 1, 0, 0, 1, 2]])


def test_labels_never_cross_a_boundary():
    rng = np.random.default_rng(0)
    stream = rng.integers(0, 6, size=5000)  # EOS is 0: many short documents
    b = pack_samples(stream, np.arange(num_samples(len(stream), 32)), 32, EOS)
    pos, lab, inp = b["position_ids"], b["labels"], b["input_ids"]
    # Where the next position restarts at 0 inside a sample, the label there must be ignored.
    restart = pos[:, 1:] == 0
    assert (lab[:, :-1][restart] == IGNORE_INDEX).all()
    assert ((lab == IGNORE_INDEX) == (inp == EOS)).all()
    # Positions count up by one within a document.
    cont = ~restart
    assert (pos[:, 1:][cont] == pos[:, :-1][cont] + 1).all()
