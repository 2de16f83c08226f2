"""Damaged prepared data is caught before it trains: shard checksums (`.idx` at open, `.bin` in
the background), and token ids the model cannot look up, checked in every batch."""
import hashlib
import json
import logging
import re

import numpy as np
import pytest

from data import ArraySource, DataConfig, Loader
from data.prepare import prepare_shards
from data.shards import ShardError, ShardSource, read_manifest, write_manifest
from tests.data.test_shards import make_dataset, random_docs


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(3)
    return make_dataset(tmp_path / "d", [random_docs(rng, n, 1000) for n in (6, 9, 4, 7)])


def _flip_offset_bit(idx):
    """Flip the low bit of one inner offset so that the offsets still increase."""
    offsets = np.load(idx)
    i = next(i for i in range(1, len(offsets) - 1)
             if offsets[i - 1] < offsets[i] ^ 1 < offsets[i + 1])
    offsets[i] ^= 1
    with open(idx, "wb") as f:
        np.save(f, offsets)


def test_flipped_idx_bit_is_caught_at_open(dataset):
    _flip_offset_bit(dataset / "shard_00001.idx")
    with pytest.raises(ShardError, match=r"shard_00001\.idx does not match its checksum in .*manifest\.json"):
        ShardSource(dataset)


def test_damaged_bin_is_named_and_stops_reads(dataset):
    path = dataset / "shard_00002.bin"
    raw = bytearray(path.read_bytes())
    raw[3] ^= 0x01
    path.write_bytes(bytes(raw))
    src = ShardSource(dataset)  # the .bin is checked in the background
    with pytest.raises(ShardError, match=r"shard_00002\.bin does not match its checksum"):
        src.verify()
    with pytest.raises(ShardError, match=r"shard_00002\.bin does not match its checksum"):
        src.read(0, 0, 1)  # any read, once the damage is known


def test_only_the_first_rank_reads_the_bins(dataset, monkeypatch):
    """Other ranks skip the .bin pass (the first rank's check stops the job) but still check
    every .idx at open."""
    path = dataset / "shard_00002.bin"
    raw = bytearray(path.read_bytes())
    raw[3] ^= 0x01
    path.write_bytes(bytes(raw))
    monkeypatch.setenv("RANK", "1")
    src = ShardSource(dataset)
    src.verify()
    assert src.read(0, 0, 1).shape == (1,)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ShardError, match=r"shard_00002\.bin does not match its checksum"):
        ShardSource(dataset).verify()


def test_intact_shards_verify_and_copies_check_too(dataset):
    import pickle

    src = ShardSource(dataset)
    src.verify()
    copy = pickle.loads(pickle.dumps(src))
    copy.verify()
    assert copy.read(0, 0, 2).tolist() == src.read(0, 0, 2).tolist()


def test_old_manifest_without_checksums_opens_with_a_warning(dataset, caplog):
    m = read_manifest(dataset)
    for entry in m["shards"]:
        del entry["sha256"]
    write_manifest(dataset, m)
    _flip_offset_bit(dataset / "shard_00001.idx")  # undetectable without checksums
    with caplog.at_level(logging.WARNING, logger="data"):
        src = ShardSource(dataset)
    src.verify()
    assert "4 of 4 shards have no checksums" in caplog.text and str(dataset) in caplog.text


def test_prepare_records_the_checksums_of_the_files(tmp_path, demo_data):
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"document number {i} " * (i + 1)}) + "\n"
                             for i in range(12)))
    out = tmp_path / "out"
    prepare_shards([str(jsonl)], out, tokenizer=demo_data.tokenizer.path, docs_per_shard=5,
                   progress=False)
    shards = read_manifest(out)["shards"]
    assert len(shards) == 3
    for entry in shards:
        for ext in ("bin", "idx"):
            data = (out / f"{entry['name']}.{ext}").read_bytes()
            assert entry["sha256"][ext] == hashlib.sha256(data).hexdigest()
    # a re-run (resume check of the finished shards) catches a damaged index
    _flip_offset_bit(out / "shard_00001.idx")
    with pytest.raises(ShardError, match=r"shard_00001\.idx does not match its checksum"):
        prepare_shards([str(jsonl)], out, tokenizer=demo_data.tokenizer.path, docs_per_shard=5,
                       progress=False)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_ids_beyond_the_vocab_inside_a_bin_are_named(tmp_path, prefetch):
    rng = np.random.default_rng(5)
    shards = [random_docs(rng, n, 500) for n in (5, 8)]
    shards[1][3][2] = 777  # damaged data: an id the model cannot look up
    d = make_dataset(tmp_path / "d", shards)
    m = read_manifest(d)
    for entry in m["shards"]:
        entry["max_token_id"] = min(entry["max_token_id"], 499)  # understated
    write_manifest(d, m)
    loader = Loader(DataConfig(name="shards", path=str(d), seq_len=16, prefetch=prefetch),
                    seed=0, global_batch=2)
    loader.check_vocab(500)  # the manifest's ids pass
    with pytest.raises(ValueError) as e:
        for _ in range(200):
            loader.next_batch()
    loader.close()
    msg = str(e.value)
    assert "token id 777" in msg and "model.vocab_size is 500" in msg
    found = re.search(r"\((\S+shard_00001\.bin), document 3 of the shard, byte offset (\d+)", msg)
    assert found, msg
    stored = np.fromfile(found.group(1), dtype="<u2")
    assert stored[int(found.group(2)) // 2] == 777


def test_a_bad_label_past_the_sample_end_is_caught_with_its_offset():
    tokens = np.arange(40) % 50
    tokens[8] = 900  # first token of sample 1, already the label of sample 0's last input
    src = ArraySource(tokens, np.array([0, 40]), name="arr", max_token_id=49)  # understated
    loader = Loader(DataConfig(seq_len=8), seed=0, global_batch=1, sources=[src])
    loader.check_vocab(100)
    with pytest.raises(ValueError, match=r"'arr' holds token id 900 at token 8 of document 0, but "
                                         r"model.vocab_size is 100"):
        loader.next_batch()
    unchecked = Loader(DataConfig(seq_len=8), seed=0, global_batch=1, sources=[src])
    assert unchecked.next_batch()["labels"][0, -1] == 900  # what the check stops
