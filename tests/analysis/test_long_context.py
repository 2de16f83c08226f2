"""Long-context evaluation (`analysis/long_context.py`, `launch/evaluate.py`) on a trained tiny
model: bucket losses against a full forward, passkey prompts, greedy decoding, scoring, the CLI."""
import json
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

import analysis.long_context as lc
from analysis.report import position_losses
from data import ArraySource, open_sources
from data.demo import demo_documents
from data.prepare import prepare_shards
from data.tokenizer import load_tokenizer
from launch.evaluate import main as evaluate
from analysis.evaluate import data_config, load_model
from train.export import export_checkpoint
from tests.data.test_hf_tokenizer import EOS, build_bpe


@pytest.fixture(scope="module")
def loaded(tiny_run):
    return load_model(tiny_run)


@pytest.fixture(scope="module")
def tok(loaded):
    return lc.model_tokenizer(loaded)


def write_shards(tmp_path, name, **tokenizer):
    """Token shards of the demo corpus' first 60k characters, four docstrings a document."""
    texts = demo_documents(60_000)
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": "\n\n".join(texts[i:i + 4])}) + "\n"
                           for i in range(0, len(texts), 4)))
    prepare_shards([str(src)], tmp_path / name, progress=False, **tokenizer)
    return str(tmp_path / name)


def test_bucket_bounds_and_labels():
    assert lc.bucket_edges(512, 64) == [0, 64, 128, 256, 512]
    assert lc.bucket_edges(3000) == [0, 1024, 2048, 3000]
    assert lc.bucket_edges(100) == [0, 100]
    edges = lc.bucket_edges(131072)
    assert [lc.bucket_label(a, b) for a, b in zip(edges, edges[1:])] == [
        "0-1k", "1-2k", "2-4k", "4-8k", "8-16k", "16-32k", "32-64k", "64-128k"]
    assert lc.bucket_label(2048, 3000) == "2048-3000"


def test_bucket_losses_equal_a_full_forward(loaded, monkeypatch):
    monkeypatch.setattr(lc, "default_chunk_tokens", lambda vocab: 100)  # chunks cross bucket bounds
    sources = open_sources(data_config(loaded)).sources
    seqs = lc.select_sequences(sources, 512, 3, seed=1)
    got = lc.loss_by_position(loaded.model, seqs, lc.bucket_edges(512, 64))

    losses = []
    with torch.no_grad():
        for s in seqs:
            logits = loaded.model(s.ids[None]).logits[0]
            losses.append(F.cross_entropy(logits[:-1], s.ids[1:], reduction="none"))
    losses, target_pos = torch.stack(losses), torch.arange(1, 512).expand(3, 511)
    for label, (a, b) in {"0-64": (0, 64), "64-128": (64, 128), "128-256": (128, 256),
                          "256-512": (256, 512)}.items():
        inside = (target_pos >= a) & (target_pos < b)
        assert got[label]["tokens"] == int(inside.sum())
        assert got[label]["loss"] == pytest.approx(float(losses[inside].mean()), abs=1e-5)
    assert list(got) == ["0-64", "64-128", "128-256", "256-512"]


def test_long_documents_first_then_contiguous_ones_packed():
    lengths = [10, 30, 5, 40, 7, 8, 20]
    docs, start = [], 0
    for n in lengths:
        docs.append(list(range(start, start + n)))
        start += n
    source = ArraySource.from_documents(docs, name="s")
    seqs = lc.select_sequences([source], 25, 3)
    assert [s.documents for s in seqs] == [[1], [3], [0, 2, 4, 5]]
    assert seqs[0].ids.tolist() == docs[1][:25] and not seqs[0].packed
    assert seqs[2].ids.tolist() == (docs[0] + docs[2] + docs[4] + docs[5])[:25] and seqs[2].packed
    with pytest.raises(ValueError, match="not enough for --samples 4 sequences of --seq-len 25"):
        lc.select_sequences([source], 25, 4)
    # only the documents given (a run's held-out split), in id order
    seqs = lc.select_sequences([source], 25, 2, documents=[[6, 3, 2, 0, 5]])
    assert [s.documents for s in seqs] == [[3], [0, 2, 5, 6]]
    with pytest.raises(ValueError, match="holds 55 tokens"):
        lc.select_sequences([source], 25, 3, documents=[[3, 0, 2]])


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE tokenizer (Qwen-like: no word-start prefix, unlike sentencepiece)."""
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    build_bpe(path)
    return load_tokenizer(path, eos=EOS)


@pytest.mark.parametrize("kind", ["sentencepiece", "bpe"])
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_passkey_prompt_has_the_key_at_its_depth_and_the_length(tok, bpe, kind, depth):
    tok = {"sentencepiece": tok, "bpe": bpe}[kind]
    p = lc.passkey_prompt(tok, 512, "40721", depth)
    filler, needle, question, key = lc.spaced_pieces(tok, lc.FILLER, lc.NEEDLE.format(key="40721"),
                                                     lc.QUESTION, "40721")
    assert 512 - len(filler) < len(p.ids) + p.answer_tokens <= 512 and p.answer_tokens == len(key)
    assert p.ids[p.key_at:p.key_at + len(needle)] == needle and p.ids[-len(question):] == question
    sentences = (len(p.ids) - len(needle) - len(question)) // len(filler)
    assert p.key_at % len(filler) == 0 and p.depth == p.key_at // len(filler) / sentences
    assert abs(p.depth - depth) <= 0.5 / sentences
    text = tok.decode(p.ids + key).strip()   # reads as plain sentences joined by spaces
    before = round(p.depth * sentences)
    assert text == " ".join([lc.FILLER] * before + ["The pass key is 40721. Remember it."]
                            + [lc.FILLER] * (sentences - before) + [lc.QUESTION, "40721"])
    with pytest.raises(ValueError, match="--passkey-lengths 40: too short"):
        lc.passkey_prompt(tok, 40, "40721", depth)


def test_greedy_decoding_matches_an_argmax_loop(loaded, tok):
    prompt = lc.passkey_prompt(tok, 256, "55190", 0.5)
    ids = list(prompt.ids)
    with torch.no_grad():
        for _ in range(prompt.answer_tokens):
            ids.append(int(loaded.model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert lc.greedy_decode(loaded.model, prompt.ids, prompt.answer_tokens) == ids[len(prompt.ids):]
    with torch.no_grad():
        full = loaded.model(torch.tensor([ids])).logits[0, -1]
    assert torch.allclose(lc.next_token_logits(loaded.model, torch.tensor(ids)), full, atol=1e-5)


def scripted(tok, answer_for):
    """A `next_token_logits` that reads the key from the prompt and writes `answer_for(key)`."""
    question = tok.encode(lc.QUESTION)

    def logits(model, ids):
        ids = ids.tolist()
        key = re.search(r"pass key is (\d+)\. Remember", tok.decode(ids)).group(1)
        end = max(i + len(question) for i in range(len(ids)) if ids[i:i + len(question)] == question)
        answer = tok.encode(answer_for(key))
        out = torch.zeros(tok.vocab_size)
        out[answer[min(len(ids) - end, len(answer) - 1)]] = 1.0
        return out
    return logits


@pytest.mark.parametrize("answer_for, accuracy", [
    (lambda key: key, 1.0),                                  # an oracle
    (lambda key: key[:-1] + str((int(key[-1]) + 1) % 10), 0.0),  # one digit off
    (lambda key: "the", 0.0),                                # a constant answer
])
def test_passkey_scores(tok, monkeypatch, answer_for, accuracy):
    monkeypatch.setattr(lc, "next_token_logits", scripted(tok, answer_for))
    got = lc.passkey_accuracy(torch.nn.Linear(1, 1), tok, [256, 512], trials=3, seed=4)
    assert {n: v["accuracy"] for n, v in got.items()} == {256: accuracy, 512: accuracy}
    keys = [t["key"] for v in got.values() for t in v["trials"]]
    assert len(set(keys)) == 6 and all(re.fullmatch(r"\d{5}", k) for k in keys)
    assert all(t["correct"] == (accuracy == 1.0) for v in got.values() for t in v["trials"])


def test_cli_writes_the_evaluation_the_report_reads(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    args = [str(run), "--seq-len", "2048", "--samples", "3", "--first-bucket", "256",
            "--passkey-lengths", "256", "--passkey-trials", "2", "--device", "cpu"]
    assert evaluate(args + ["--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    out = run / "eval" / "step_00000006.json"
    result = json.loads(out.read_text())
    assert printed["out"] == str(out) and result["step"] == 6 and result["data"]["packed"] == 1
    assert list(result["loss_by_position"]) == ["0-256", "256-512", "512-1024", "1-2k"]
    assert result["tokens_by_position"]["1-2k"] == 3 * 1024
    assert any("1 of 3 sequences pack contiguous documents" in n for n in result["notes"])
    trials = result["passkey_trials"]["256"]
    assert result["passkey"]["256"] == sum(t["correct"] for t in trials) / 2 and len(trials) == 2
    assert position_losses(str(run), []) == [("step_00000006", result["loss_by_position"])]

    assert evaluate(args) == 1 and "already exists; pass --overwrite" in capsys.readouterr().err
    assert evaluate(args + ["--overwrite", "--seq-len", "512", "--samples", "2", "--passkey-lengths"]) == 0
    table = capsys.readouterr().out
    assert re.search(r"loss 256-512 +\d+\.\d{4} \(512 tokens\)", table) and "passkey" not in table
    assert json.loads(out.read_text())["passkey"] == {}


def test_converted_directory_reads_held_out_shards(tiny_run, tok, tmp_path):
    """An export has no run config: --data is needed, and its loss equals the checkpoint's."""
    dst = str(tmp_path / "hf")
    export_checkpoint(tiny_run, dst, dtype=torch.float32)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):  # an export without them
        (tmp_path / "hf" / name).unlink(missing_ok=True)
    shards = write_shards(tmp_path, "held_out", tokenizer=tok.path)
    common = dict(seq_len=256, samples=2, first_bucket=64, passkey_lengths=[], data_path=shards)
    with pytest.raises(ValueError, match="cannot load the tokenizer .* pass --tokenizer"):
        lc.evaluate_long_context(dst, **common)
    got = lc.evaluate_long_context(dst, tokenizer=str(tok.path), **common)
    assert got["step"] is None and got["data"]["source"] == "--data" and got["data"]["packed"] == 0
    ours = lc.evaluate_long_context(tiny_run, **common)
    assert got["loss_by_position"] == pytest.approx(ours["loss_by_position"], abs=1e-5)
    assert lc.default_out(dst) == f"{dst}/eval/long_context.json"


@pytest.mark.parametrize("args, message", [
    (["{tmp}/nope"], "{tmp}/nope: not a checkpoint"),
    (["{run}", "--seq-len", "8192"], "--seq-len 8192: must be within 2 .. 4096"),
    (["{run}", "--passkey-lengths", "256", "5000"], "--passkey-lengths 5000: must be within 2 .. 4096"),
    (["{run}", "--seq-len", "4096", "--samples", "100"],
     "not enough for --samples 100 sequences of --seq-len 4096"),
    (["{run}", "--data", "{tmp}"], "--data {tmp}: not a token shard directory"),
    (["{run}", "--data", "{other}"], "--data {other} was tokenized by another tokenizer"),
    (["{run}", "--tokenizer", "{other}/tokenizer.model"],
     "the training data 'demo' was tokenized by another tokenizer than {other}/tokenizer.model"),
    (["{run}", "--samples", "0"], "--samples must be >= 1"),
])
def test_errors_name_the_path_or_option(tiny_run, tmp_path_factory, capsys, args, message):
    tmp = tmp_path_factory.mktemp("errors")
    other = tmp / "other"
    if any("{other}" in a for a in args):
        other = write_shards(tmp, "other", train_vocab=400)
    fill = dict(run=tiny_run, tmp=tmp, other=other)
    assert evaluate([a.format(**fill) for a in args] + ["--out", str(tmp / "e.json")]) == 1
    assert message.format(**fill) in capsys.readouterr().err
    assert not (tmp / "e.json").exists()
