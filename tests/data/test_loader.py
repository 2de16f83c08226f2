"""The loader: one global document stream, exact resume, any data-parallel size, prefetching."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from data import ArraySource, DataConfig, Loader, build_loader
from tests.data.synthetic import epoch_tokens, order, synthetic_source

CFG = DataConfig(seq_len=32)


def make(sources, *, seed=0, global_batch=8, dp_rank=0, dp_size=1, weights=None, **changes):
    cfg = dataclasses.replace(CFG, **changes)
    return Loader(cfg, seed=seed, global_batch=global_batch, dp_rank=dp_rank, dp_size=dp_size,
                  sources=sources, weights=weights)


def take(loader, steps):
    return [loader.next_batch() for _ in range(steps)]


def flat(batches, key="input_ids"):
    return torch.cat([b[key].flatten() for b in batches]).numpy()


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


@pytest.fixture(scope="module")
def one():
    return [synthetic_source(0, 300, lengths=(1, 60))]


@pytest.fixture(scope="module")
def mix():
    return [synthetic_source(k, 200, lengths=(1, 30 * (k + 1))) for k in range(3)]


def test_round_trip_one_epoch(one):
    """Samples concatenated over an epoch are every document exactly once, in stream order."""
    src = one[0]
    total = int(src.doc_lengths.sum())
    loader = make(one, seed=4, global_batch=4)
    steps = -(-total // loader.tokens_per_step) + 2
    stream = flat(take(loader, steps))
    np.testing.assert_array_equal(stream[:total], epoch_tokens(src, 4, 0))
    # The next epoch follows with its own order.
    rest = stream[total:]
    np.testing.assert_array_equal(rest, epoch_tokens(src, 4, 1)[: len(rest)])
    assert not np.array_equal(order(src, 4, 0), order(src, 4, 1))
    assert loader.state_dict()["sources"]["s0"]["epoch"] == 1


def test_mixture_round_trip(mix):
    """With several sources, each source's documents still come whole and in its own order."""
    stream = flat(take(make(mix, seed=2, weights=[1, 1, 1]), 30))
    for k, src in enumerate(mix):
        mine = stream[stream // 10_000_000 == k]
        np.testing.assert_array_equal(mine, epoch_tokens(src, 2, 0)[: len(mine)])
    # Documents are never interleaved: a source changes only where a document ends.
    switch = np.flatnonzero(np.diff(stream // 10_000_000)) + 1
    for i in switch:
        k = stream[i - 1] // 10_000_000
        assert stream[i - 1] - k * 10_000_000 + 1 in mix[k].doc_offsets


def test_batch_layout(one):
    loader = make(one, global_batch=8)
    b = loader.next_batch()
    assert sorted(b) == ["input_ids", "labels", "position_ids"]
    assert all(v.dtype == torch.int64 and v.shape == (8, 32) for v in b.values())
    assert loader.tokens_per_step == 8 * 32


def test_determinism_and_seed(mix):
    a = take(make(mix, seed=1), 5)
    assert same(a, take(make(mix, seed=1), 5))
    assert not same(a, take(make(mix, seed=2), 5))


@pytest.mark.parametrize("at", [0, 1, 7, 23])
def test_resume_equals_uninterrupted(mix, at):
    whole = take(make(mix, seed=3, weights=[3, 2, 1]), 30)
    first = make(mix, seed=3, weights=[3, 2, 1])
    take(first, at)
    resumed = make(mix, seed=3, weights=[3, 2, 1])
    resumed.load_state_dict(first.state_dict())
    assert same(whole[at:], take(resumed, 30 - at))


def test_state_is_small_and_plain(mix):
    loader = make(mix)
    take(loader, 3)
    state = loader.state_dict()
    assert state["samples"] == 24 and set(state["sources"]) == {"s0", "s1", "s2"}
    assert sum(s["tokens"] for s in state["sources"].values()) == 3 * 8 * 32
    assert json.loads(json.dumps(state)) == state


@pytest.mark.parametrize("dp_size", [2, 4])
def test_same_global_stream_for_any_dp_size(mix, dp_size):
    whole = take(make(mix, seed=5), 4)
    ranks = [make(mix, seed=5, dp_rank=r, dp_size=dp_size) for r in range(dp_size)]
    parts = [take(r, 4) for r in ranks]
    for step, batch in enumerate(whole):
        for k, v in batch.items():
            assert torch.equal(torch.cat([parts[r][step][k] for r in range(dp_size)]), v)
    assert all(r.state_dict() == ranks[0].state_dict() for r in ranks)


def test_resume_with_another_dp_size(mix):
    whole = take(make(mix, seed=6), 6)
    first = [make(mix, seed=6, dp_rank=r, dp_size=4) for r in range(4)]
    for r in first:
        take(r, 3)
    state = first[2].state_dict()  # any rank's state
    halves = []
    for r in range(2):
        loader = make(mix, seed=6, dp_rank=r, dp_size=2)
        loader.load_state_dict(state)
        halves.append(take(loader, 3))
    for step in range(3):
        assert torch.equal(torch.cat([h[step]["input_ids"] for h in halves]), whole[3 + step]["input_ids"])


def test_resume_with_another_global_batch(one):
    stream = flat(take(make(one, global_batch=4), 10))
    first = make(one, global_batch=4)
    take(first, 3)
    second = make(one, global_batch=2)
    second.load_state_dict(first.state_dict())
    np.testing.assert_array_equal(flat(take(second, 14)), stream[3 * 4 * 32:])


@pytest.mark.parametrize("depth", [1, 3])
def test_prefetch_keeps_order_and_state(mix, depth):
    plain = make(mix, seed=7)
    ahead = make(mix, seed=7, prefetch=depth)
    for _ in range(6):
        assert same([plain.next_batch()], [ahead.next_batch()])
        assert ahead.state_dict() == plain.state_dict()  # batches prepared ahead do not count
    # Resuming from a prefetching loader, and resuming into one, continue the same stream.
    state = ahead.state_dict()
    ahead.close()
    rest = take(plain, 4)
    other = make(mix, seed=7, prefetch=depth)
    other.next_batch()  # its thread is running ahead; loading must drop that
    other.load_state_dict(state)
    assert same(take(other, 4), rest)
    assert same(take(ahead, 2), take(make_at(mix, state, seed=7), 2))


def make_at(sources, state, **kw):
    loader = make(sources, **kw)
    loader.load_state_dict(state)
    return loader


def test_prefetch_error_reaches_the_caller():
    class Broken(ArraySource):
        def read(self, doc, start, stop):
            raise OSError("disk gone")

    src = Broken(np.arange(100), np.array([0, 50, 100]), name="broken")
    loader = make([src], prefetch=2)
    for _ in range(2):  # also on the call after the failure
        with pytest.raises(OSError, match="disk gone"):
            loader.next_batch()
    loader.close()


def test_vocab_check(one):
    loader = make([ArraySource(np.array([5, 9, 2, 7, 2]), np.array([0, 3, 5]), name="web")])
    assert loader.vocab_size == 10
    loader.check_vocab(10)
    with pytest.raises(ValueError, match=r"'web' holds token id 9 but model.vocab_size is 9"):
        loader.check_vocab(9)


def test_different_tokenizers_are_refused():
    a = synthetic_source(0, 10, fingerprint="aaaa")
    b = synthetic_source(1, 10, fingerprint="bbbb")
    with pytest.raises(ValueError, match=r"source 1: data source 's1' was tokenized by another tokenizer"):
        make([a, b])


@pytest.mark.parametrize("offsets", [[0], [0, 0, 0]])
def test_empty_source_is_refused(one, offsets):
    empty = ArraySource(np.zeros(0, dtype=np.int64), np.array(offsets), name="empty", fingerprint="tok")
    with pytest.raises(ValueError, match="'empty' holds no tokens"):
        make([one[0], empty])


def test_duplicate_names_are_refused():
    with pytest.raises(ValueError, match="both named 'x'"):
        make([synthetic_source(0, 5, name="x"), synthetic_source(1, 5, name="x")])


@pytest.mark.parametrize(
    "kwargs, setting",
    [
        (dict(global_batch=6, dp_size=4), "train.global_batch"),
        (dict(global_batch=0), "train.global_batch"),
        (dict(seed=-1), "train.seed"),
        (dict(dp_rank=2, dp_size=2), "dp_rank"),
        (dict(weights=[1, 0]), "weight"),
        (dict(weights=[1]), "weight"),
    ],
)
def test_bad_arguments(kwargs, setting):
    sources = [synthetic_source(0, 5), synthetic_source(1, 5)]
    with pytest.raises(ValueError, match=setting):
        make(sources, **kwargs)


def test_resume_mismatches_are_errors(one):
    state = make(one, seed=3).state_dict()
    with pytest.raises(ValueError, match="train.seed"):
        make(one, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="'s0' holds 299 documents but the checkpoint's loader state has 300"):
        make([synthetic_source(0, 299)], seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        make(one, seed=3).load_state_dict({"epoch": 0, "position": 5, "seed": 3})
    bad = make(one, seed=3).state_dict()
    bad["sources"]["s0"]["offset"] = 10_000
    with pytest.raises(ValueError, match="invalid data loader state"):
        make(one, seed=3).load_state_dict(bad)


def test_demo_loader(demo_cfg, demo_data):
    loader = build_loader(demo_cfg, seed=0, global_batch=4, dp_rank=1, dp_size=2)
    b = loader.next_batch()
    assert b["input_ids"].shape == (2, 64)
    assert loader.vocab_size == 512 and loader.eos_id == demo_data.tokenizer.eos_id
    assert int(b["input_ids"].max()) < 512
    text = demo_data.tokenizer.decode(b["input_ids"].flatten().tolist())
    assert " the " in text
    loader.check_vocab(512)
    with pytest.raises(ValueError, match="model.vocab_size"):
        loader.check_vocab(256)


def test_demo_round_trip(demo_cfg, demo_data):
    """The demo corpus's documents, in stream order, once per epoch; EOS ends each."""
    src = demo_data.source
    total = int(src.doc_lengths.sum())
    loader = build_loader(dataclasses.replace(demo_cfg, seq_len=1024), seed=1, global_batch=8)
    stream = flat(take(loader, -(-total // loader.tokens_per_step)))
    np.testing.assert_array_equal(stream[:total], epoch_tokens(src, 1, 0))
    eos = demo_data.tokenizer.eos_id
    assert (stream[:total] == eos).sum() == len(src.doc_lengths)
