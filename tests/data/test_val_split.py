"""The validation split (data.val_docs): held-out documents never reach training, the validation
samples are exactly those documents whatever the seed, ranks or seq_len, and resumes keep both."""
import dataclasses
import logging

import numpy as np
import pytest
import torch

from data import DataConfig, DocumentPermutation, Loader
from data.packing import IGNORE_INDEX
from data.stream import DocumentStream
from data.validation import ValidationSplit, validation_order
from tests.data.synthetic import BASE, source_of, synthetic_source


def make(sources, weights=None, *, seed=0, global_batch=8, **changes):
    cfg = dataclasses.replace(DataConfig(seq_len=64), **changes)
    return Loader(cfg, seed=seed, global_batch=global_batch, sources=sources, weights=weights)


def docs_of(tokens, sources):
    """(source, document) of every synthetic token, as one int array source * 10**6 + document."""
    tokens = np.asarray(tokens).reshape(-1)
    k = source_of(tokens)
    out = np.empty(len(tokens), dtype=np.int64)
    for i, s in enumerate(sources):
        mine = k == i
        out[mine] = i * 10**6 + np.searchsorted(s.doc_offsets, tokens[mine] - i * BASE, side="right") - 1
    return out


def trained_tokens(loader, steps):
    return torch.cat([loader.next_batch()["input_ids"].flatten() for _ in range(steps)]).numpy()


@pytest.fixture(scope="module")
def two():
    return [synthetic_source(0, 300, lengths=(1, 60)), synthetic_source(1, 80, lengths=(20, 200))]


def held(loader):
    return {i * 10**6 + d for i, o in enumerate(loader.split.order) for d in o.tolist()}


def test_held_out_documents_are_never_trained(two):
    loader = make(two, [0.6, 0.4], val_docs=7)
    tokens = trained_tokens(loader, 80)  # several epochs of both sources
    assert min(e["epoch"] for e in loader.state_dict()["sources"].values()) >= 2
    seen = set(np.unique(docs_of(tokens, two)).tolist())
    everything = {i * 10**6 + d for i, s in enumerate(two) for d in range(len(s.doc_lengths))}
    assert held(loader) and not seen & held(loader)
    assert seen == everything - held(loader)  # every other document is trained on
    # the plan never names a held-out document either (document ids, not only tokens)
    stream = DocumentStream(two, [1, 1], seed=3, held_out=loader.split.order)
    planned = set()
    for _ in range(30):
        plan = stream.plan(8, 64)
        planned |= {s * 10**6 + d for s, d in zip(plan.source, plan.doc)}
    assert len(planned) > 300 and not planned & held(loader)


def test_training_stream_is_the_unsplit_one_minus_the_held_out_documents(two):
    """Per source, the split stream's tokens are the stream without a split, held-out documents
    removed: the order of everything else is as in a run without validation."""
    plain = trained_tokens(make(two, [0.6, 0.4], seed=5), 60)
    split = make(two, [0.6, 0.4], seed=5, val_docs=9)
    kept = trained_tokens(split, 60)
    for k in range(2):
        a, b = plain[source_of(plain) == k], kept[source_of(kept) == k]
        a = a[~np.isin(docs_of(a, two), list(held(split)))]
        n = min(len(a), len(b))
        assert n > 2000
        np.testing.assert_array_equal(a[:n], b[:n])


def test_without_a_split_the_state_is_as_before(two):
    loader = make(two, val_docs=0)
    loader.next_batch()
    state = loader.state_dict()
    assert set(state) == {"version", "seed", "samples", "sources", "mixture"}
    assert not loader.split
    with pytest.raises(ValueError, match="data.val_docs"):
        loader.validation_set()
    split = make(two, val_docs=4)
    split.next_batch()
    assert split.state_dict()["validation"] == {"s0": 4, "s1": 4}


def test_the_split_depends_on_the_source_name_only(two):
    """Same documents for any seed, dp size, batch size and seq_len; a larger split keeps the
    smaller one's documents; another name holds out others."""
    ref = make(two, seed=0, val_docs=6).split.order
    for kwargs in [dict(seed=99), dict(global_batch=2), dict(seq_len=17)]:
        other = make(two, val_docs=6, **kwargs).split.order
        assert all(np.array_equal(a, b) for a, b in zip(ref, other))
    larger = make(two, val_docs=12).split.order
    assert all(np.array_equal(a, b[:6]) for a, b in zip(ref, larger))
    renamed = synthetic_source(0, 300, lengths=(1, 60), name="web")
    assert not np.array_equal(validation_order(renamed, 6), ref[0])
    assert len(set(ref[0].tolist())) == 6


@pytest.mark.parametrize("seq_len", [8, 64, 1000])
def test_validation_samples_are_the_held_out_documents(two, seq_len):
    loader = make(two, seq_len=seq_len, val_docs=5)
    vs = loader.validation_set()
    order = loader.split.order
    docs = [two[k].read(int(d), 0, int(two[k].doc_lengths[d])) for k in range(2) for d in order[k]]
    expected = np.concatenate(docs)
    assert (vs.documents, vs.tokens, vs.targets) == (10, len(expected), len(expected) - 10)
    assert vs.num_samples == -(-len(expected) // seq_len)
    b = vs.samples(0, vs.num_samples + 2)  # two samples past the end: all padding
    inputs, labels, positions = b["input_ids"].reshape(-1), b["labels"].reshape(-1), b["position_ids"].reshape(-1)
    n = len(expected)
    np.testing.assert_array_equal(inputs[:n], expected)
    assert (inputs[n:] == 0).all() and (labels[n:] == IGNORE_INDEX).all()
    # a label is the next token of the same document (synthetic: token + 1), else ignored
    ends = np.cumsum([len(d) for d in docs]) - 1
    want = np.where(np.isin(np.arange(n), ends), IGNORE_INDEX, expected + 1)
    np.testing.assert_array_equal(labels[:n], want)
    assert int((labels != IGNORE_INDEX).sum()) == vs.targets
    # positions restart at every document start and every sample start
    starts = np.zeros(len(inputs), dtype=bool)
    starts[np.concatenate([[0], ends[:-1] + 1])] = True
    starts[::seq_len] = True
    starts[n] = n < len(inputs)
    seg = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    np.testing.assert_array_equal(positions, np.arange(len(inputs)) - first[seg])


@pytest.mark.parametrize("dp", [1, 2, 3])
def test_any_slicing_gives_the_same_samples(two, dp):
    vs = make(two, seq_len=16, val_docs=5).validation_set()
    whole = vs.samples(0, vs.num_samples)
    per = -(-vs.num_samples // dp)
    parts = [vs.samples(r * per, per) for r in range(dp)]
    for key in whole:
        joined = np.concatenate([p[key] for p in parts])
        np.testing.assert_array_equal(joined[:vs.num_samples], whole[key])


def test_resume_with_a_split_equals_uninterrupted(two):
    a = make(two, [0.6, 0.4], val_docs=5)
    trained_tokens(a, 7)
    state = a.state_dict()
    rest = trained_tokens(a, 9)
    b = make(two, [0.6, 0.4], val_docs=5, seq_len=64)
    b.load_state_dict(state)
    np.testing.assert_array_equal(trained_tokens(b, 9), rest)


def test_turning_the_split_on_at_resume_counts_documents_already_trained(two, caplog):
    """A checkpoint saved without a split: the warning names how many of the newly held-out
    documents the stream had already trained on (checked against the trained tokens), and a
    held-out document cut by the checkpoint is not continued."""
    sources = [two[0]]
    val = 150  # half the documents, so the stream's current document is likely one of them
    held_ids = set(ValidationSplit(sources, val).order[0].tolist())
    plain = make(sources, global_batch=1, seq_len=16)
    seen: set = set()
    for _ in range(2000):
        seen |= set(np.unique(docs_of(plain.next_batch()["input_ids"], sources)).tolist())
        entry = plain.state_dict()["sources"]["s0"]
        current = int(plain.stream.order(0, 0)(np.array([entry["position"]]))[0])
        if entry["epoch"] == 0 and entry["position"] > 100 and entry["offset"] and current in held_ids:
            break
    else:
        pytest.fail("no checkpoint cut a document of the split")
    state = plain.state_dict()
    caplog.set_level(logging.INFO, logger="data")
    split = make(sources, global_batch=1, seq_len=16, val_docs=val)
    split.load_state_dict(state)
    trained = len(seen & held_ids)
    assert f"{trained} of the {val} documents newly held out" in caplog.text
    later = set(np.unique(docs_of(trained_tokens(split, 300), sources)).tolist())
    assert not later & held_ids
    # a smaller split from the same checkpoint: its own exact count
    caplog.clear()
    smaller = make(sources, global_batch=1, seq_len=16, val_docs=40)
    smaller.load_state_dict(state)
    small_trained = len(seen & set(smaller.split.order[0].tolist()))
    assert 0 < small_trained < trained
    assert f"{small_trained} of the 40 documents newly held out" in caplog.text
    caplog.clear()
    split_state = split.state_dict()
    off = make(sources, global_batch=1, seq_len=16)
    off.load_state_dict(split_state)
    assert "return from the validation split" in caplog.text and "newly held out" not in caplog.text


def test_enlarging_the_split_counts_only_the_added_documents(two, caplog):
    a = make(two, [1, 1], val_docs=3)
    trained_tokens(a, 60)  # past epoch 0 of the small source: all its documents were trained on
    caplog.set_level(logging.INFO, logger="data")
    b = make(two, [1, 1], val_docs=8)
    b.load_state_dict(a.state_dict())
    assert "data source 's1': 5 of the 5 documents newly held out" in caplog.text


def test_bad_split_sizes_are_refused(two):
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="data.val_docs must be an integer >= 0"):
            DataConfig(val_docs=bad)
    with pytest.raises(ValueError, match="data.val_docs=300 would hold out every document of data source 's0'"):
        make(two, val_docs=300)


def test_a_split_holding_every_token_is_refused():
    """Documents left to train on, but all empty: refused (the stream would find no token)."""
    n, val = 6, 2
    probe = synthetic_source(0, n, lengths=(1, 1))
    lengths = np.zeros(n, dtype=np.int64)
    lengths[validation_order(probe, val)] = 5
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    source = type(probe)(np.arange(offsets[-1]), offsets, name="s0")
    with pytest.raises(ValueError, match="data.val_docs=2 holds out every token of data source 's0'"):
        ValidationSplit([source], val)
    ValidationSplit([source], 1)  # one of the two full documents stays in training


def test_demo_split(demo_cfg, demo_data):
    """The demo source with a split: document ids of the plan avoid the split for a whole epoch,
    and the validation samples are the held-out documents' tokens."""
    cfg = dataclasses.replace(demo_cfg, val_docs=8)
    loader = Loader(cfg, seed=1, global_batch=8)
    vs = loader.validation_set()
    source = loader.sources[0]
    ids = loader.split.order[0]
    expected = np.concatenate([source.read(int(d), 0, int(source.doc_lengths[d])) for d in ids])
    got = vs.samples(0, vs.num_samples)["input_ids"].reshape(-1)[:vs.tokens]
    np.testing.assert_array_equal(got, expected)
    stream = DocumentStream([source], [1.0], seed=1, held_out=loader.split.order)
    planned = set()
    while stream.epoch[0] == 0:
        planned |= set(stream.plan(8, 64).doc)
    assert planned == set(range(len(source.doc_lengths))) - set(ids.tolist())


@pytest.mark.parametrize("n", [1, 2, 5, 64, 1000, 4097])
def test_permutation_inverse(n):
    perm = DocumentPermutation(n, f"key{n}".encode())
    x = np.arange(n)
    np.testing.assert_array_equal(perm.inverse(perm(x)), x)
    np.testing.assert_array_equal(perm(perm.inverse(x)), x)
    with pytest.raises(IndexError):
        perm.inverse(np.array([n]))
