"""The token shard format: writer, reader (`ShardSource`), and detection of damaged shards."""
import json
import pickle

import numpy as np
import pytest

from data.shards import (FORMAT, VERSION, ShardError, ShardSource, ShardWriter, read_manifest,
                         shard_dtype, write_manifest)

FP = "ab" * 32


def make_dataset(directory, shards, *, vocab_size=1000, complete=True, domain="web"):
    """Write `shards` (a list of shards, each a list of 1-D token arrays) with a manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    dtype = shard_dtype(vocab_size)
    entries = []
    for k, docs in enumerate(shards):
        w = ShardWriter(directory, k, dtype)
        if docs:  # two appends: chunks of one shard go to the same files
            half = len(docs) // 2
            for part in (docs[:half], docs[half:]):
                w.append(np.concatenate(part or [np.zeros(0, dtype)]).astype(dtype),
                         np.array([len(d) for d in part], dtype=np.int64))
        entries.append(w.finish())
    write_manifest(directory, {
        "format": FORMAT, "version": VERSION, "complete": complete, "domain": domain, "dtype": dtype.name,
        "tokenizer": {"kind": "hf", "path": "/tok.json", "fingerprint": FP, "vocab_size": vocab_size, "eos_id": 0},
        "shards": entries, "command": ["python", "launch/prepare_data.py", "--input", "x"],
        "totals": {"documents": sum(e["documents"] for e in entries), "tokens": sum(e["tokens"] for e in entries)}})
    return directory


def random_docs(rng, n, vocab_size):
    return [np.append(rng.integers(1, vocab_size, rng.integers(0, 40)), 0) for _ in range(n)]


@pytest.fixture
def docs():
    rng = np.random.default_rng(0)
    return [random_docs(rng, 7, 1000), [], random_docs(rng, 1, 1000), random_docs(rng, 12, 1000)]


def test_dtype_choice():
    assert shard_dtype(512) == shard_dtype(65_536) == np.dtype("<u2")
    assert shard_dtype(65_537) == shard_dtype(152_064) == np.dtype("<u4")


def test_round_trip(tmp_path, docs):
    src = ShardSource(make_dataset(tmp_path / "web-v1", docs))
    flat = [d for shard in docs for d in shard]
    assert (src.name, src.domain, src.fingerprint, len(src)) == ("web-v1", "web", FP, 20)
    assert src.doc_lengths.dtype == np.int64
    assert src.doc_lengths.tolist() == [len(d) for d in flat]
    assert src.max_token_id == max(int(d.max()) for d in flat)
    for i, d in enumerate(flat):
        np.testing.assert_array_equal(src.read(i, 0, len(d)), d)
        np.testing.assert_array_equal(src.read(i, 1, max(len(d) - 1, 1)), d[1:max(len(d) - 1, 1)])
    view = src.read(19, 0, 3)
    assert isinstance(view.base, np.memmap) or isinstance(view, np.memmap)  # a view, not a copy
    with pytest.raises(IndexError):
        src.read(0, 0, len(flat[0]) + 1)
    with pytest.raises(IndexError):
        src.read(-1, 0, 1)
    assert ShardSource(tmp_path / "web-v1", name="web").name == "web"
    raw = (tmp_path / "web-v1" / "shard_00000.bin").read_bytes()
    assert raw == np.concatenate(docs[0]).astype("<u2").tobytes()  # raw little-endian, nothing else
    idx = np.load(tmp_path / "web-v1" / "shard_00000.idx")
    assert idx.tolist() == np.cumsum([0] + [len(d) for d in docs[0]]).tolist()


def test_uint32_and_lru_and_pickle(tmp_path):
    rng = np.random.default_rng(1)
    docs = [random_docs(rng, 3, 200_000) for _ in range(4)]
    src = ShardSource(make_dataset(tmp_path / "big", docs, vocab_size=200_000), max_open=2)
    assert src.dtype == np.dtype("<u4") and src.max_token_id > 65_535
    assert (tmp_path / "big" / "shard_00000.bin").stat().st_size == 4 * sum(map(len, docs[0]))
    flat = [d for shard in docs for d in shard]
    for _ in range(2):  # evicted maps are mapped again
        for i, d in enumerate(flat):
            np.testing.assert_array_equal(src.read(i, 0, len(d)), d)
    assert len(src._maps) == 2
    copy = pickle.loads(pickle.dumps(src))
    assert len(copy._maps) == 0
    np.testing.assert_array_equal(copy.read(11, 0, len(flat[11])), flat[11])


def test_tokenizer_fingerprint_checked(tmp_path, docs):
    src = ShardSource(make_dataset(tmp_path / "d", docs))
    src.check_tokenizer(FP)
    with pytest.raises(ShardError, match=f"{tmp_path / 'd'} was tokenized by another tokenizer"):
        src.check_tokenizer("cd" * 32)


def test_incomplete_preparation_says_how_to_resume(tmp_path, docs):
    make_dataset(tmp_path / "d", docs, complete=False)
    with pytest.raises(ShardError, match=r"interrupted \(4 shards finished\).*re-running `python "
                                         r"launch/prepare_data.py --input x`"):
        ShardSource(tmp_path / "d")
    with pytest.raises(ShardError, match="no manifest.json"):
        ShardSource(tmp_path)


def _truncate(path, n):
    path.write_bytes(path.read_bytes()[:-n])


def _swap_offsets(path):
    offsets = np.load(path)
    offsets[1], offsets[2] = offsets[2], offsets[1]
    with open(path, "wb") as f:
        np.save(f, offsets)


@pytest.mark.parametrize("damage, message", [
    (lambda d: _truncate(d / "shard_00003.bin", 1), r"shard_00003\.bin holds \d+ bytes, not a whole number"),
    (lambda d: _truncate(d / "shard_00003.bin", 2), r"shard_00003\.bin holds \d+ tokens but its index"),
    (lambda d: (d / "shard_00002.idx").unlink(), r"shard_00002\.idx is missing"),
    (lambda d: (d / "shard_00000.bin").unlink(), r"shard_00000\.bin is missing"),
    (lambda d: _truncate(d / "shard_00003.idx", 5), r"shard_00003\.idx is unreadable"),
    (lambda d: _swap_offsets(d / "shard_00000.idx"), r"shard_00000\.idx has decreasing offsets"),
])
def test_damaged_shards_are_named(tmp_path, docs, damage, message):
    d = make_dataset(tmp_path / "d", docs)
    damage(d)
    with pytest.raises(ShardError, match=message):
        ShardSource(d)


def test_manifest_disagreeing_with_files(tmp_path, docs):
    d = make_dataset(tmp_path / "d", docs)
    m = read_manifest(d)
    m["shards"][3]["documents"] += 1
    write_manifest(d, m)
    with pytest.raises(ShardError, match=r"shard_00003\.bin holds 12 documents .* the manifest says 13"):
        ShardSource(d)
    m["shards"][3]["documents"] -= 1
    m["totals"]["tokens"] += 1
    write_manifest(d, m)
    with pytest.raises(ShardError, match="totals .* disagree"):
        ShardSource(d)
    (d / "manifest.json").write_text(json.dumps({**m, "version": VERSION + 1}))
    with pytest.raises(ShardError, match="format version"):
        ShardSource(d)


def test_aborted_writer_leaves_nothing(tmp_path):
    w = ShardWriter(tmp_path, 0, np.dtype("<u2"))
    w.append(np.arange(5, dtype="<u2"), np.array([2, 3]))
    w.abort()
    assert list(tmp_path.iterdir()) == []
