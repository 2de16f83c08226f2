"""The keyed document order: a bijection for every size, different per seed, source and epoch."""
import numpy as np
import pytest

from data import DocumentPermutation, permutation_key


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 13, 64, 97, 1000, 4099, 65_537])
def test_bijection(n):
    out = DocumentPermutation(n, permutation_key(0, "web", 0))(np.arange(n))
    assert out.dtype == np.int64
    np.testing.assert_array_equal(np.sort(out), np.arange(n))


def test_any_slice_and_shape():
    perm = DocumentPermutation(1009, permutation_key(3, "code", 2))
    whole = perm(np.arange(1009))
    np.testing.assert_array_equal(perm(np.arange(500, 700)), whole[500:700])
    np.testing.assert_array_equal(perm(np.array([[5, 6], [7, 8]])), whole[5:9].reshape(2, 2))
    assert perm(np.zeros(0, dtype=np.int64)).shape == (0,)
    with pytest.raises(IndexError):
        perm(np.array([1009]))


def test_differs_by_seed_source_and_epoch():
    n = 1000
    base = DocumentPermutation(n, permutation_key(0, "web", 0))(np.arange(n))
    for key in (permutation_key(1, "web", 0), permutation_key(0, "code", 0), permutation_key(0, "web", 1)):
        other = DocumentPermutation(n, key)(np.arange(n))
        assert (other == base).mean() < 0.05  # about 1/n agree by chance
    again = DocumentPermutation(n, permutation_key(0, "web", 0))(np.arange(n))
    np.testing.assert_array_equal(again, base)


def test_looks_shuffled():
    n = 10_000
    out = DocumentPermutation(n, permutation_key(0, "web", 0))(np.arange(n))
    assert abs(np.corrcoef(np.arange(n), out)[0, 1]) < 0.05
    assert np.mean(np.diff(out) == 1) < 0.01  # no long runs kept in order


def test_huge_domains_need_no_memory():
    n = 10**12  # positions are computed, never a table of n entries
    out = DocumentPermutation(n, permutation_key(0, "web", 0))(np.arange(10**5) * 7_919_993)
    assert out.min() >= 0 and out.max() < n and len(np.unique(out)) == 10**5


def test_size_must_be_positive():
    with pytest.raises(ValueError):
        DocumentPermutation(0, b"k")
