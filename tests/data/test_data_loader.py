import dataclasses

import numpy as np
import pytest
import torch

from data import IGNORE_INDEX, Loader, build_loader


def make(cfg, data, *, seed=0, global_batch=8, dp_rank=0, dp_size=1, **changes):
    cfg = dataclasses.replace(cfg, **changes)
    return Loader(cfg, seed=seed, global_batch=global_batch, dp_rank=dp_rank, dp_size=dp_size, data=data)


def take(loader, steps):
    return [loader.next_batch() for _ in range(steps)]


def same(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_batch_layout(demo_cfg, demo_data):
    loader = make(demo_cfg, demo_data, global_batch=8)
    b = loader.next_batch()
    assert sorted(b) == ["input_ids", "labels", "position_ids"]
    assert all(v.dtype == torch.int64 and v.shape == (8, 64) for v in b.values())
    assert loader.tokens_per_step == 8 * 64
    assert loader.vocab_size == 512 and loader.eos_id == demo_data.tokenizer.eos_id
    assert int(b["input_ids"].max()) < loader.vocab_size


def test_build_loader_uses_cfg(demo_cfg):
    loader = build_loader(demo_cfg, seed=0, global_batch=4, dp_rank=1, dp_size=2)
    assert loader.next_batch()["input_ids"].shape == (2, 64)
    assert loader.tokenizer.vocab_size == 512


def test_one_epoch_reproduces_the_stream(demo_cfg, demo_data):
    loader = make(demo_cfg, demo_data, global_batch=1, seq_len=256)
    n, L = loader.num_samples, 256
    tokens = np.asarray(demo_data.tokens, dtype=np.int64)
    rows = {}
    for _ in range(n):
        b = loader.next_batch()
        rows[tuple(b["input_ids"][0].tolist())] = b["labels"][0].numpy()
    assert len(rows) == n and loader.state_dict()["epoch"] == 1
    pieces = []
    for k in range(n):
        key = tuple(tokens[k * L : (k + 1) * L].tolist())
        labels = rows[key]  # every sample of the stream appears exactly once per epoch
        keep = labels != IGNORE_INDEX
        np.testing.assert_array_equal(labels[keep], tokens[k * L + 1 : (k + 1) * L + 1][keep])
        pieces.append(key)
    np.testing.assert_array_equal(np.concatenate(pieces), tokens[: n * L])


def test_text_is_readable(demo_cfg, demo_data):
    b = make(demo_cfg, demo_data).next_batch()
    text = demo_data.tokenizer.decode(b["input_ids"].flatten().tolist())
    assert " the " in text


def test_determinism_and_seed(demo_cfg, demo_data):
    a = take(make(demo_cfg, demo_data, seed=1), 3)
    b = take(make(demo_cfg, demo_data, seed=1), 3)
    c = take(make(demo_cfg, demo_data, seed=2), 3)
    assert same(a, b)
    assert not same(a, c)


def test_resume_continues_identically(demo_cfg, demo_data):
    whole = take(make(demo_cfg, demo_data, seed=3, global_batch=64), 40)  # crosses epochs
    first = make(demo_cfg, demo_data, seed=3, global_batch=64)
    take(first, 17)
    state = first.state_dict()
    assert set(state) >= {"epoch", "position", "seed", "seq_len"}
    resumed = make(demo_cfg, demo_data, seed=3, global_batch=64)
    resumed.load_state_dict(dict(state))
    assert same(whole[17:], take(resumed, 23))


def test_resume_mismatch_is_an_error(demo_cfg, demo_data):
    state = make(demo_cfg, demo_data, seed=3).state_dict()
    with pytest.raises(ValueError, match="train.seed"):
        make(demo_cfg, demo_data, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="data.seq_len"):
        make(demo_cfg, demo_data, seed=3, seq_len=32).load_state_dict(state)


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_rank_slices_make_the_global_batch(demo_cfg, demo_data, dp_size):
    whole = take(make(demo_cfg, demo_data, seed=5, global_batch=8), 3)
    ranks = [take(make(demo_cfg, demo_data, seed=5, global_batch=8, dp_rank=r, dp_size=dp_size), 3)
             for r in range(dp_size)]
    for step, batch in enumerate(whole):
        for k, v in batch.items():
            assert torch.equal(torch.cat([ranks[r][step][k] for r in range(dp_size)]), v)


def test_resume_with_another_dp_size(demo_cfg, demo_data):
    single = make(demo_cfg, demo_data, seed=6, global_batch=8)
    take(single, 5)
    state = single.state_dict()
    whole = take(single, 2)
    halves = []
    for r in range(2):
        loader = make(demo_cfg, demo_data, seed=6, global_batch=8, dp_rank=r, dp_size=2)
        loader.load_state_dict(state)
        halves.append(take(loader, 2))
    for step in range(2):
        assert torch.equal(torch.cat([halves[0][step]["input_ids"], halves[1][step]["input_ids"]]),
                           whole[step]["input_ids"])


def test_epoch_rollover(demo_cfg, demo_data):
    # Few, long samples and a global batch that does not divide them: steps straddle epochs.
    loader = make(demo_cfg, demo_data, seed=7, global_batch=7, seq_len=4096)
    n = loader.num_samples
    assert 7 < n and n % 7
    seen = torch.cat([b["input_ids"] for b in take(loader, 2 * n // 7 + 1)])
    rows = [tuple(r.tolist()) for r in seen]
    epoch0, epoch1 = rows[:n], rows[n : 2 * n]
    assert len(set(epoch0)) == n and set(epoch0) == set(epoch1)  # each sample once per epoch
    assert epoch0 != epoch1  # a fresh permutation
    state = loader.state_dict()
    assert state["epoch"] * n + state["position"] == 7 * (2 * n // 7 + 1)


def test_global_batch_larger_than_an_epoch(demo_cfg, demo_data):
    loader = make(demo_cfg, demo_data, seed=8, global_batch=1, seq_len=4096)
    n = loader.num_samples
    big = make(demo_cfg, demo_data, seed=8, global_batch=2 * n + 3, seq_len=4096)
    rows = big.next_batch()["input_ids"]
    singles = torch.cat([b["input_ids"] for b in take(loader, 2 * n + 3)])
    assert torch.equal(rows, singles)


@pytest.mark.parametrize(
    "kwargs, setting",
    [
        (dict(global_batch=6, dp_size=4), "train.global_batch"),
        (dict(global_batch=0), "train.global_batch"),
        (dict(seed=-1), "train.seed"),
        (dict(dp_rank=2, dp_size=2), "dp_rank"),
    ],
)
def test_bad_arguments(demo_cfg, demo_data, kwargs, setting):
    with pytest.raises(ValueError, match=setting):
        make(demo_cfg, demo_data, **kwargs)


def test_too_little_data_for_seq_len(demo_cfg, demo_data):
    with pytest.raises(ValueError, match="data.seq_len"):
        make(demo_cfg, demo_data, seq_len=len(demo_data.tokens))
