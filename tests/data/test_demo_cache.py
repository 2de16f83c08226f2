import dataclasses
import json
import threading

import numpy as np
import pytest

from data import demo
from data.demo import cache_key, prepare_demo

SMALL = dict(demo_chars=40_000, vocab_size=400)


def entry_of(cfg):
    return cfg.resolved_cache_dir() / "demo" / cache_key(cfg)


def test_entry_contents(demo_cfg, demo_data):
    entry = entry_of(demo_cfg)
    assert sorted(p.name for p in entry.iterdir()) == [
        "doc_offsets.npy", "meta.json", "tokenizer.model", "tokens.npy"]
    meta = json.loads((entry / "meta.json").read_text())
    assert meta == demo_data.meta
    assert meta["tokenizer_fingerprint"] == demo_data.tokenizer.fingerprint
    src = demo_data.source
    assert meta["tokens"] == len(src.tokens) and meta["vocab_size"] == 512
    assert meta["corpus_chars"] >= 200_000 and meta["documents"] == len(src.doc_lengths) > 50
    assert src.tokens.dtype == np.uint16 and meta["max_token_id"] == src.max_token_id == src.tokens.max()
    assert (src.name, src.domain, src.fingerprint) == ("demo", "demo", demo_data.tokenizer.fingerprint)
    eos = demo_data.tokenizer.eos_id
    assert int(np.sum(src.tokens == eos)) == meta["documents"]
    ends = src.doc_offsets[1:] - 1
    assert (src.tokens[ends] == eos).all()  # each document ends with its EOS
    first = src.read(0, 0, src.doc_lengths[0] - 1)
    assert demo_data.tokenizer.decode(first.tolist()) == demo.demo_documents(200_000)[0]


def test_key_covers_what_changes_the_contents(demo_cfg):
    key = cache_key(demo_cfg)
    assert "chars200000" in key and "vocab512" in key and f"v{demo.VERSION}" in key
    assert cache_key(dataclasses.replace(demo_cfg, vocab_size=1024)) != key
    assert cache_key(dataclasses.replace(demo_cfg, seq_len=128)) == key  # packing is done at load


def test_second_prepare_reads_the_cache(demo_cfg, demo_data, monkeypatch):
    entry = entry_of(demo_cfg)
    stamps = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}

    def no_rebuild(*_):
        raise AssertionError("the cached entry was rebuilt")

    monkeypatch.setattr(demo, "demo_documents", no_rebuild)
    monkeypatch.setattr(demo, "train_sentencepiece", no_rebuild)
    again = prepare_demo(demo_cfg)
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == stamps
    assert again.tokenizer.fingerprint == demo_data.tokenizer.fingerprint
    np.testing.assert_array_equal(again.source.tokens, demo_data.source.tokens)
    np.testing.assert_array_equal(again.source.doc_offsets, demo_data.source.doc_offsets)


def test_leftover_temporary_is_not_taken_for_an_entry(demo_cfg, tmp_path):
    cfg = dataclasses.replace(demo_cfg, cache_dir=str(tmp_path), **SMALL)
    final = entry_of(cfg)
    half = final.parent / f".{final.name}.tmp-crashed"  # what an interrupted build leaves
    half.mkdir(parents=True)
    (half / "tokens.npy").write_bytes(b"garbage")
    data = prepare_demo(cfg)
    assert data.meta["documents"] > 0 and final.is_dir()
    assert not any(p.name.startswith(f".{final.name}.tmp-") and p != half for p in final.parent.iterdir())


def test_failed_build_leaves_nothing(demo_cfg, tmp_path, monkeypatch):
    cfg = dataclasses.replace(demo_cfg, cache_dir=str(tmp_path), **SMALL)

    def broken(*_):
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(demo, "train_sentencepiece", broken)
    with pytest.raises(ValueError, match="data.vocab_size"):
        prepare_demo(cfg)
    assert not entry_of(cfg).exists()
    assert [p for p in entry_of(cfg).parent.iterdir() if ".tmp-" in p.name] == []


def test_concurrent_builders_agree(demo_cfg, tmp_path, monkeypatch):
    cfg = dataclasses.replace(demo_cfg, cache_dir=str(tmp_path), **SMALL)
    results, errors, trainings = [], [], []
    train = demo.train_sentencepiece
    monkeypatch.setattr(demo, "train_sentencepiece", lambda *a: trainings.append(1) or train(*a))

    def run():
        try:
            results.append(prepare_demo(cfg))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(trainings) == 1  # the others waited for the first builder
    assert len({r.tokenizer.fingerprint for r in results}) == 1
    assert all(np.array_equal(r.source.tokens, results[0].source.tokens) for r in results)


def test_corrupt_entry_is_reported(demo_cfg, tmp_path):
    cfg = dataclasses.replace(demo_cfg, cache_dir=str(tmp_path), **SMALL)
    prepare_demo(cfg)
    meta_path = entry_of(cfg) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["tokens"] += 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(RuntimeError, match="delete it to rebuild"):
        prepare_demo(cfg)
