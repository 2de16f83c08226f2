"""Reading documents: formats, folders and globs, text modes, bad input, hub names offline."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.text_sources import HubUnreachable, Record, TextReader, resolve_input

DOCS = ["first document\nwith two lines", "second — naïve café 東京", "third\n\nwith a paragraph break"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_table(path, texts, field="text", fmt="parquet"):
    table = pa.table({field: texts, "id": list(range(len(texts)))})
    if fmt == "parquet":
        pq.write_table(table, path)
    else:
        with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
            w.write_table(table)


def docs_of(*inputs, **kw):
    return list(TextReader(list(inputs), **kw).documents())


def test_formats_give_the_same_documents(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": d, "meta": i} for i, d in enumerate(DOCS)])
    (tmp_path / "b.json").write_text(json.dumps([{"text": d} for d in DOCS]))
    write_table(tmp_path / "c.parquet", DOCS)
    write_table(tmp_path / "d.arrow", DOCS, fmt="arrow")
    for name in ("a.jsonl", "b.json", "c.parquet", "d.arrow"):
        assert docs_of(tmp_path / name) == DOCS, name
    write_jsonl(tmp_path / "e.data", [{"body": d} for d in DOCS])
    assert docs_of(tmp_path / "e.data", input_format="json", text_field="body") == DOCS


def test_folders_and_globs_read_sorted_files(tmp_path):
    for i, d in enumerate(DOCS):
        sub = tmp_path / "corpus" / ("z" if i == 0 else "a")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{9 - i}.txt").write_text(d)
    (tmp_path / "corpus" / ".hidden.txt").write_text("never read")
    (tmp_path / "corpus" / "notes.md").write_text("unknown extension: left out of a folder walk")
    expected = [DOCS[2], DOCS[1], DOCS[0]]  # a/7.txt, a/8.txt, z/9.txt
    assert docs_of(tmp_path / "corpus") == expected
    assert docs_of(str(tmp_path / "corpus" / "**" / "*.txt")) == expected
    assert docs_of(str(tmp_path / "corpus" / "a" / "*.txt"), str(tmp_path / "corpus" / "z")) == expected
    with pytest.raises(ValueError, match="matched by inputs"):
        TextReader([str(tmp_path / "corpus"), str(tmp_path / "corpus" / "z" / "9.txt")])


def test_text_modes(tmp_path):
    (tmp_path / "t.txt").write_text("para one\nline two\n\n\npara two\n\n   \n\npara three\n")
    assert docs_of(tmp_path / "t.txt") == ["para one\nline two\n\n\npara two\n\n   \n\npara three\n"]
    assert docs_of(tmp_path / "t.txt", text_mode="paragraph") == ["para one\nline two", "para two", "para three"]
    assert docs_of(tmp_path / "t.txt", text_mode="line") == ["para one", "line two", "para two", "para three"]


def test_empty_inputs_are_skipped_and_reported(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "empty.txt").write_bytes(b"")
    write_jsonl(tmp_path / "rows.jsonl", [{"text": "kept"}, {"text": ""}, {"text": " \n\t"}, {"other": 1}])
    recs = list(TextReader([str(tmp_path / "*")]).records())
    assert recs == [Record(None, "empty_file"), Record(None, "empty_file"), Record("kept", None),
                    Record(None, "empty"), Record(None, "empty"), Record(None, "missing_text")]
    write_table(tmp_path / "none.parquet", [])
    write_table(tmp_path / "none.arrow", [], fmt="arrow")
    recs = list(TextReader([tmp_path / "none.parquet", tmp_path / "none.arrow"]).records())
    assert recs == [Record(None, "empty_file")] * 2


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_invalid_utf8_replaced_or_skipped(tmp_path, kind):
    bad = b"caf\xe9 au lait \xff\xfe!"
    if kind == "txt":
        (tmp_path / "a.txt").write_bytes(b"good")
        (tmp_path / "b.txt").write_bytes(bad)
    else:
        (tmp_path / "a.jsonl").write_bytes(b'{"text": "good"}\n{"text": "' + bad + b'"}\n')
    recs = list(TextReader([str(tmp_path / f"*.{kind}")]).records())
    assert recs == [Record("good", None), Record("caf\ufffd au lait \ufffd\ufffd!", "invalid_utf8")]
    recs = list(TextReader([str(tmp_path / f"*.{kind}")], invalid_utf8="skip").records())
    assert recs == [Record("good", None), Record(None, "invalid_utf8")]


def test_missing_text_field_names_file_and_fields(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"content": "x", "url": "u"}])
    with pytest.raises(ValueError, match=r"a\.jsonl: no text field 'text' \(fields: content, url\).*--text-field"):
        docs_of(tmp_path / "a.jsonl")
    write_table(tmp_path / "b.parquet", ["x"], field="body")
    with pytest.raises(ValueError, match=r"b\.parquet: no text field 'content' \(fields: body, id\)"):
        docs_of(tmp_path / "b.parquet", text_field="content")
    with pytest.raises(ValueError, match=r"b\.parquet: field 'id' holds int"):
        docs_of(tmp_path / "b.parquet", text_field="id")


def test_bad_paths(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="x.csv: unknown file type.*--format"):
        resolve_input(str(tmp_path / "x.csv"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_input(str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match="no files match"):
        resolve_input(str(tmp_path / "*.parquet"))
    (tmp_path / "d").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no data files"):
        resolve_input(str(tmp_path / "d"))
    src = resolve_input("someorg/somedata:en")
    assert (src.hub, src.hub_config, src.files) == ("someorg/somedata", "en", ())


def test_unreachable_hub_fails_fast_and_says_so(monkeypatch):
    import datasets.config
    from huggingface_hub import constants

    # nothing listens there: refused at once (no network in tests; `load_dataset` alone would
    # retry for ~25 s before failing)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(HubUnreachable, match="'someorg/somedata'.*hub could not be reached"):
        docs_of("someorg/somedata")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnreachable, match="'someorg/other'.*hub could not be reached.*HF_HUB_OFFLINE"):
        docs_of("hf:someorg/other")
