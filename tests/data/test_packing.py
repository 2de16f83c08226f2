"""Packing planned document pieces: inputs, next-token labels masked at document ends, positions."""
import numpy as np
import pytest

from data import IGNORE_INDEX, ArraySource, DataConfig, Loader, Plan, pack
from tests.data.synthetic import is_document_end, is_document_start, synthetic_source

X = IGNORE_INDEX
EOS = 2
# Hand-made documents, each ending with EOS.
DOCS = [[11, 12, 13, EOS], [21, 22, EOS], [31, 32, 33, 34, 35, EOS], [41, EOS]]


class Recording(ArraySource):
    """Remembers which documents were read."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.reads = []

    def read(self, doc, start, stop):
        self.reads.append((doc, start, stop))
        return super().read(doc, start, stop)


def source():
    lengths = [len(d) for d in DOCS]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return Recording(np.concatenate(DOCS).astype(np.uint16), offsets, name="hand")


def plan(*samples):
    """samples: lists of (doc, start, stop) pieces."""
    p = Plan()
    for pieces in samples:
        for doc, start, stop in pieces:
            p.source.append(0), p.doc.append(doc), p.start.append(start), p.stop.append(stop)
            p.length.append(len(DOCS[doc]))
        p.first.append(len(p.source))
    return p


def test_boundaries_positions_and_labels():
    p = plan([(0, 0, 4)], [(1, 0, 3), (2, 0, 1)], [(2, 1, 5)], [(2, 5, 6), (3, 0, 2), (0, 0, 1)])
    b = pack(p, [source()], 0, 4, 4)
    assert all(v.dtype == np.int64 and v.shape == (4, 4) for v in b.values())
    np.testing.assert_array_equal(b["input_ids"], [[11, 12, 13, 2], [21, 22, 2, 31], [32, 33, 34, 35],
                                                   [2, 41, 2, 11]])
    # An EOS never predicts the next document; a piece cut at a sample end predicts its continuation.
    np.testing.assert_array_equal(b["labels"], [[12, 13, 2, X], [22, 2, X, 32], [33, 34, 35, 2],
                                                [X, 2, X, 12]])
    # Positions restart at each document start and at each sample start.
    np.testing.assert_array_equal(b["position_ids"], [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3],
                                                      [0, 0, 1, 0]])


def test_a_rank_reads_only_its_samples():
    src = source()
    p = plan([(0, 0, 4)], [(1, 0, 3), (3, 0, 1)], [(2, 0, 4)], [(2, 4, 6), (3, 0, 2)])
    b = pack(p, [src], 1, 2, 4)
    np.testing.assert_array_equal(b["input_ids"], [[21, 22, 2, 41], [31, 32, 33, 34]])
    np.testing.assert_array_equal(b["labels"], [[22, 2, X, 2], [32, 33, 34, 35]])
    assert src.reads == [(1, 0, 3), (3, 0, 2), (2, 0, 5)]  # one token past a cut piece, for its label


def test_short_read_is_reported():
    class Truncated(ArraySource):
        def read(self, doc, start, stop):
            return super().read(doc, start, stop)[:-1]

    src = Truncated(np.arange(8), np.array([0, 8]), name="broken")
    p = Plan(source=[0], doc=[0], start=[0], stop=[4], length=[8], first=[0, 1])
    with pytest.raises(RuntimeError, match="broken"):
        pack(p, [src], 0, 1, 4)


@pytest.mark.parametrize("packing", ["mixed", "domain"])
def test_labels_and_positions_on_many_documents(packing):
    sources = [synthetic_source(k, 150, seed=1, lengths=(1, 50), domain=f"d{k % 2}") for k in range(3)]
    loader = Loader(DataConfig(seq_len=32, packing=packing), seed=0, global_batch=8, sources=sources,
                    weights=[1, 2, 3])
    for _ in range(20):
        b = {k: v.numpy() for k, v in loader.next_batch().items()}
        inp, lab, pos = b["input_ids"], b["labels"], b["position_ids"]
        end = is_document_end(inp, sources)
        # The label is the next token of the same document (token + 1), or ignored at its end.
        np.testing.assert_array_equal(lab, np.where(end, X, inp + 1))
        # Position 0 exactly at document starts and sample starts; +1 elsewhere.
        restart = is_document_start(inp, sources)
        restart[:, 0] = True
        assert (pos[restart] == 0).all()
        assert (pos[:, 1:][~restart[:, 1:]] == pos[:, :-1][~restart[:, 1:]] + 1).all()
