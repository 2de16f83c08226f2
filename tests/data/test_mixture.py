"""Mixtures by tokens, per-domain packing, and seq_len stage changes."""
import dataclasses

import numpy as np
import pytest
import torch

from data import ArraySource, DataConfig, Loader
from tests.data.synthetic import BASE, epoch_tokens, source_of, synthetic_source


def make(sources, weights=None, *, seed=0, global_batch=8, **changes):
    cfg = dataclasses.replace(DataConfig(seq_len=64), **changes)
    return Loader(cfg, seed=seed, global_batch=global_batch, sources=sources, weights=weights)


def stream_of(loader, steps):
    return torch.cat([loader.next_batch()["input_ids"].flatten() for _ in range(steps)]).numpy()


@pytest.fixture(scope="module")
def three():
    # Different document lengths, and a small source that runs out and starts new epochs.
    return [synthetic_source(0, 2000, lengths=(1, 100)), synthetic_source(1, 500, lengths=(50, 300)),
            synthetic_source(2, 40, lengths=(1, 20))]


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1, 1, 8], [6, 1, 1]])
def test_proportions_by_tokens(three, weights):
    loader = make(three, weights)
    share = np.array(weights) / sum(weights)
    for _ in range(5):  # proportions hold all along, not just on average
        counts = np.bincount(source_of(stream_of(loader, 20)), minlength=3)
        assert np.abs(counts / counts.sum() - share).max() < 0.02
    state = loader.state_dict()["sources"]
    assert state["s2"]["epoch"] > 0  # the small source went round several times


def test_a_source_that_runs_out_starts_its_next_epoch(three):
    stream = stream_of(make(three, [1, 1, 8], seed=9), 40)
    small = stream[source_of(stream) == 2]
    total = int(three[2].doc_lengths.sum())
    epochs = np.concatenate([epoch_tokens(three[2], 9, e) for e in range(len(small) // total + 1)])
    np.testing.assert_array_equal(small, epochs[: len(small)])
    assert len(small) > 3 * total


def with_domains(sources, domains):
    return [ArraySource(s.tokens, s.doc_offsets, name=s.name, domain=d, fingerprint=s.fingerprint,
                        max_token_id=s.max_token_id) for s, d in zip(sources, domains)]


def test_domain_packing_keeps_a_sample_in_one_domain(three):
    domains = ["web", "books", "web"]
    sources = with_domains(three, domains)
    loader = make(sources, [0.5, 0.3, 0.2], packing="domain")
    rows = torch.cat([loader.next_batch()["input_ids"] for _ in range(40)]).numpy()
    domain_of_row = [{domains[k] for k in np.unique(source_of(r))} for r in rows]
    assert all(len(d) == 1 for d in domain_of_row)
    assert {"web", "books"} == set().union(*domain_of_row)
    assert any(len(np.unique(source_of(r))) == 2 for r in rows)  # "web" rows mix both web sources
    counts = np.bincount(source_of(rows.flatten()), minlength=3)
    assert np.abs(counts / counts.sum() - [0.5, 0.3, 0.2]).max() < 0.03
    # Each source's documents still come whole and in order (a cut one continues later).
    flat = rows.flatten()
    for k, s in enumerate(sources):
        mine = flat[source_of(flat) == k]
        total = int(s.doc_lengths.sum())
        expected = np.concatenate([epoch_tokens(s, 0, e) for e in range(len(mine) // total + 1)])
        np.testing.assert_array_equal(mine, expected[: len(mine)])


def test_per_source_packing_with_one_domain_each(three):
    loader = make(with_domains(three, ["a", "b", "c"]), packing="domain")
    rows = torch.cat([loader.next_batch()["input_ids"] for _ in range(3)])
    assert all(len(np.unique(source_of(r.numpy()))) == 1 for r in rows)
    assert len(np.unique(source_of(rows.numpy()))) == 3


@pytest.mark.parametrize("packing", ["mixed", "domain"])
@pytest.mark.parametrize("before, after", [(64, 256), (256, 64), (64, 100)])
def test_seq_len_stage_change_continues_the_stream(three, packing, before, after):
    """8k -> 32k: the token stream continues with no document repeated or skipped."""
    first = make(three, [2, 1, 1], seq_len=before, packing=packing)
    head = torch.cat([first.next_batch()["input_ids"].flatten() for _ in range(5)]).numpy()
    second = make(three, [2, 1, 1], seq_len=after, packing=packing)
    second.load_state_dict(first.state_dict())
    tail = stream_of(second, 5)
    stream = np.concatenate([head, tail])
    for k, s in enumerate(three):  # every source: its documents, each once, in its order
        mine = stream[source_of(stream) == k]
        total = int(s.doc_lengths.sum())
        expected = np.concatenate([epoch_tokens(s, 0, e) for e in range(len(mine) // total + 1)])
        np.testing.assert_array_equal(mine, expected[: len(mine)])
    if packing == "mixed":  # the mixed stream does not depend on seq_len at all
        reference = stream_of(make(three, [2, 1, 1], seq_len=32), 60)
        np.testing.assert_array_equal(stream, reference[: len(stream)])


def test_changed_weights_apply_from_the_resume_on(three):
    first = make(three, [1, 1, 1])
    stream_of(first, 30)
    second = make(three, [8, 1, 1])
    second.load_state_dict(first.state_dict())
    counts = np.bincount(source_of(stream_of(second, 30)), minlength=3)
    assert np.abs(counts / counts.sum() - [0.8, 0.1, 0.1]).max() < 0.02


def test_sources_added_and_removed_on_resume(three):
    first = make(three[:2])
    stream_of(first, 4)
    state = first.state_dict()
    grown = make(three)
    grown.load_state_dict(state)
    assert grown.state_dict()["sources"]["s2"]["tokens"] == 0
    assert grown.state_dict()["sources"]["s0"] == state["sources"]["s0"]
    shrunk = make(three[:1])
    shrunk.load_state_dict(state)
    stream = stream_of(shrunk, 2)
    done = state["sources"]["s0"]["tokens"]
    np.testing.assert_array_equal(stream, epoch_tokens(three[0], 0, 0)[done : done + len(stream)])


def test_tokens_never_repeat_within_an_epoch(three):
    stream = stream_of(make(three[:2], [1, 1]), 30)
    assert len(np.unique(stream)) == len(stream)
    assert stream.max() < 2 * BASE


def test_packing_mode_change_continues_every_source(three):
    sources = with_domains(three, ["web", "books", "web"])
    first = make(sources, [2, 1, 1], packing="domain")
    head = stream_of(first, 7)
    second = make(sources, [2, 1, 1], packing="mixed", seq_len=128)
    second.load_state_dict(first.state_dict())
    stream = np.concatenate([head, stream_of(second, 7)])
    for k, s in enumerate(sources):
        mine = stream[source_of(stream) == k]
        total = int(s.doc_lengths.sum())
        expected = np.concatenate([epoch_tokens(s, 0, e) for e in range(len(mine) // total + 1)])
        np.testing.assert_array_equal(mine, expected[: len(mine)])
