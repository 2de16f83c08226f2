"""Text -> shards -> ShardSource: round trips, parallel determinism, resume, refusals, the CLI."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import data.prepare as prepare_mod
from data.prepare import prepare_shards
from data.shards import ShardError, ShardSource, read_manifest
from data.tokenizer import HFTokenizer, train_sentencepiece
from tests.data.test_hf_tokenizer import EOS, build_bpe, build_wordlevel, corpus
from tests.data.test_text_sources import write_jsonl, write_table

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXTS = corpus(23)


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    return train_sentencepiece(corpus(), 512, tmp_path_factory.mktemp("sp") / "tokenizer.model")


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe")
    build_bpe(d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    return HFTokenizer(d)


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "c.jsonl"
    write_jsonl(path, [{"text": t} for t in TEXTS])
    return path


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(prepare_mod, "CHUNK_CHARS", 20_000)  # several tasks per shard


def run(inputs, out, tok, **kw):
    kw.setdefault("docs_per_shard", 5)
    return prepare_shards([str(i) for i in inputs], out, tokenizer=tok.path.parent if tok.kind == "hf"
                          else tok.path, progress=False, **kw)


def assert_round_trip(out, texts, tok):
    src = ShardSource(out)
    src.check_tokenizer(tok.fingerprint)
    assert len(src) == len(texts) and src.max_token_id < tok.vocab_size
    for i, text in enumerate(texts):
        ids = src.read(i, 0, int(src.doc_lengths[i]))
        assert ids.tolist() == tok.encode(text) + [tok.eos_id]
        assert tok.decode(ids) == text


def files_of(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "arrow", "txt-folder", "glob"])
def test_round_trip(tmp_path, sp, fmt):
    src = tmp_path / "in"
    src.mkdir()
    if fmt == "jsonl":
        write_jsonl(src / "a.jsonl", [{"text": t} for t in TEXTS])
    elif fmt in ("parquet", "arrow"):
        write_table(src / f"a.{fmt}", TEXTS[:10], fmt=fmt)
        write_table(src / f"b.{fmt}", TEXTS[10:], fmt=fmt)
    else:
        for i, t in enumerate(TEXTS):
            (src / f"{i:03d}.txt").write_text(t)
    inp = src / "*" if fmt == "glob" else src
    r = run([inp], tmp_path / "out", sp, domain="docs")
    assert (r.new_shards, r.reused_shards, r.documents) == (5, 0, len(TEXTS))
    m = r.manifest
    assert m["complete"] and m["dtype"] == "uint16" and m["domain"] == "docs"
    assert [s["inputs"] for s in m["shards"]] == [[0, 5], [5, 10], [10, 15], [15, 20], [20, 23]]
    assert m["totals"] == {"documents": 23, "tokens": r.tokens, "inputs": 23}
    assert m["tokenizer"] == {"kind": "sentencepiece", "path": str(sp.path.resolve()), "fingerprint":
                              sp.fingerprint, "vocab_size": 512, "eos_id": sp.eos_id}
    assert_round_trip(tmp_path / "out", TEXTS, sp)


@pytest.mark.parametrize("kind", ["sp", "hf"])
def test_num_proc_does_not_change_the_bytes(tmp_path, jsonl, sp, bpe, kind):
    tok = sp if kind == "sp" else bpe
    run([jsonl], tmp_path / "one", tok, num_proc=1)
    run([jsonl], tmp_path / "two", tok, num_proc=2)
    assert files_of(tmp_path / "one") == files_of(tmp_path / "two")
    assert_round_trip(tmp_path / "two", TEXTS, tok)


def test_interrupted_run_resumes_to_the_same_bytes(tmp_path, jsonl, sp, monkeypatch):
    run([jsonl], tmp_path / "ref", sp)
    monkeypatch.setattr(prepare_mod, "CHUNK_CHARS", 1)  # one document per task: call n is document n
    calls = {"n": 0}
    encode = prepare_mod._encode

    def dying_encode(texts):
        calls["n"] += 1
        if calls["n"] == 13:  # mid-way through the third shard
            raise KeyboardInterrupt
        return encode(texts)

    monkeypatch.setattr(prepare_mod, "_encode", dying_encode)
    with pytest.raises(KeyboardInterrupt):
        run([jsonl], tmp_path / "out", sp)
    m = read_manifest(tmp_path / "out")
    assert not m["complete"] and len(m["shards"]) == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "manifest.json", "shard_00000.bin", "shard_00000.idx", "shard_00001.bin", "shard_00001.idx"]
    with pytest.raises(ShardError, match="interrupted"):
        ShardSource(tmp_path / "out")
    monkeypatch.setattr(prepare_mod, "_encode", encode)
    r = run([jsonl], tmp_path / "out", sp)
    assert (r.reused_shards, r.new_shards) == (2, 3)
    assert files_of(tmp_path / "out") == files_of(tmp_path / "ref")


def test_crash_leftovers_are_redone(tmp_path, jsonl, sp):
    """A hard kill can leave: a manifest one shard behind, a shard whose .idx was not renamed yet,
    a half-written temporary file. None of it looks finished; the re-run redoes it."""
    run([jsonl], tmp_path / "ref", sp)
    out = tmp_path / "out"
    shutil.copytree(tmp_path / "ref", out)
    m = read_manifest(out)
    m["shards"], m["complete"] = m["shards"][:1], False
    (out / "manifest.json").write_text(json.dumps(m))
    (out / "shard_00002.idx").unlink()
    (out / "shard_00003.bin.tmp-99999").write_bytes(b"\x01\x02\x03")
    r = run([jsonl], out, sp)
    assert (r.reused_shards, r.new_shards) == (1, 4)
    assert files_of(out) == files_of(tmp_path / "ref")


def test_rerun_of_a_finished_run_does_nothing(tmp_path, jsonl, sp):
    run([jsonl], tmp_path / "out", sp)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir() if p.name != "manifest.json"}
    r = run([jsonl], tmp_path / "out", sp)
    assert (r.new_shards, r.reused_shards, r.documents) == (0, 5, 0)
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir() if p.name != "manifest.json"}


def test_other_request_refused_unless_overwrite(tmp_path, jsonl, sp, bpe):
    out = tmp_path / "out"
    run([jsonl], out, sp)
    snapshot = files_of(out)
    other = tmp_path / "other.jsonl"
    write_jsonl(other, [{"text": t} for t in TEXTS[:4]])
    for kw in ({"inputs": [other]}, {"tok": bpe}, {"docs_per_shard": 6}):
        args = {"inputs": [jsonl], "tok": sp, **kw}
        with pytest.raises(ValueError, match=r"holds data prepared from other inputs or settings .*--overwrite"):
            run(args.pop("inputs"), out, args.pop("tok"), **args)
        assert files_of(out) == snapshot
    r = run([other], out, sp, overwrite=True)
    assert r.manifest["totals"]["documents"] == 4 and r.new_shards == 1
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard_00000.bin", "shard_00000.idx"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no prepared data"):
        run([jsonl], foreign, sp)
    assert files_of(foreign) == {"notes.txt": b"mine"}


def test_a_failing_input_keeps_finished_shards(tmp_path, jsonl, sp):
    bad = tmp_path / "zz.jsonl"
    write_jsonl(bad, [{"body": "no text field"}])
    with pytest.raises(ValueError, match=r"zz\.jsonl: no text field 'text'"):
        run([jsonl, bad], tmp_path / "out", sp)
    m = read_manifest(tmp_path / "out")
    assert not m["complete"] and len(m["shards"]) == 4  # the 5th shard would hold zz.jsonl's record
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("policy", ["replace", "skip"])
def test_bad_records_are_counted(tmp_path, sp, policy):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_bytes(b"")
    (src / "b.txt").write_bytes("good text".encode())
    (src / "c.txt").write_bytes(b"bad \xff bytes")
    write_jsonl(src / "d.jsonl", [{"text": "x"}, {"text": "  "}, {"title": "no text"}, {"text": ""}])
    r = run([src], tmp_path / "out", sp, invalid_utf8=policy, docs_per_shard=3)
    m = r.manifest
    kept = ["good text"] + (["bad \ufffd bytes"] if policy == "replace" else []) + ["x"]
    assert m["totals"] == {"documents": len(kept), "tokens": r.tokens, "inputs": 7}
    expected = {"empty": 2, "empty_file": 1, "missing_text": 1}
    assert m["skipped"] == (expected if policy == "replace" else {**expected, "invalid_utf8": 1})
    assert m["replaced"] == ({"invalid_utf8": 1} if policy == "replace" else {})
    assert_round_trip(tmp_path / "out", kept, sp)


def test_large_vocab_gives_uint32_shards(tmp_path):
    build_wordlevel(tmp_path / "tokenizer.json", n_words=70_000)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    write_jsonl(tmp_path / "w.jsonl", [{"text": "w69999 w1 w65536"}, {"text": "w3"}])
    r = prepare_shards([str(tmp_path / "w.jsonl")], tmp_path / "out", tokenizer=tmp_path, progress=False)
    assert r.manifest["dtype"] == "uint32"
    src = ShardSource(tmp_path / "out")
    assert src.read(0, 0, 4).tolist() == [69_999, 1, 65_536, 70_001] and src.max_token_id == 70_001
    assert np.fromfile(tmp_path / "out" / "shard_00000.bin", "<u4").tolist() == [69_999, 1, 65_536, 70_001, 3, 70_001]


def test_trained_tokenizer_is_stored_and_reused(tmp_path, jsonl):
    r = prepare_shards([str(jsonl)], tmp_path / "out", train_vocab=400, progress=False, docs_per_shard=10)
    tok_path = tmp_path / "out" / "tokenizer.model"
    assert r.manifest["tokenizer"]["path"] == str(tok_path.resolve())
    assert r.manifest["tokenizer"]["vocab_size"] == 400
    mtime = tok_path.stat().st_mtime_ns
    r = prepare_shards([str(jsonl)], tmp_path / "out", train_vocab=400, progress=False, docs_per_shard=10)
    assert r.new_shards == 0 and tok_path.stat().st_mtime_ns == mtime
    from data.tokenizer import SentencePieceTokenizer
    assert_round_trip(tmp_path / "out", TEXTS, SentencePieceTokenizer(tok_path))


def test_cli_end_to_end(tmp_path, jsonl):
    script = os.path.join(ROOT, "launch", "prepare_data.py")
    args = [sys.executable, script, "--input", str(jsonl), "--train-tokenizer", "400", "--output",
            str(tmp_path / "out"), "--num-proc", "2", "--docs-per-shard", "10", "--domain", "books"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "3 shards (3 new, 0 already done), 23 documents" in r.stdout and "tokens/s" in r.stdout
    assert "tokenizing" in r.stderr  # the progress bar
    src = ShardSource(tmp_path / "out")
    assert (len(src), src.domain) == (23, "books")
    assert read_manifest(tmp_path / "out")["command"][1:] == args[1:]
    r = subprocess.run(args[:-2] + ["--domain", "web"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "error:" in r.stderr and "--overwrite" in r.stderr


def test_corrected_command_takes_over_a_directory_left_by_a_run_that_produced_nothing(tmp_path):
    """A first run that fails before finishing any shard (wrong text field) must not block the
    corrected command; a directory with finished shards still needs --overwrite."""
    from data.demo import demo_documents

    src = tmp_path / "in.jsonl"
    docs = list(demo_documents(60_000))[:30]
    src.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="text"):
        prepare_shards([str(src)], out, train_vocab=600, progress=False)
    result = prepare_shards([str(src)], out, train_vocab=600, text_field="body", progress=False)
    assert result.manifest["complete"] and len(ShardSource(out).doc_lengths) == 30
    with pytest.raises(ValueError, match="--overwrite"):
        prepare_shards([str(src)], out, train_vocab=600, text_field="body", domain="other",
                       progress=False)
