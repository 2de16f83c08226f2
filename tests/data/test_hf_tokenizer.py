"""Hugging Face tokenizer.json support and `load_tokenizer`; tokenizers are built here, never downloaded."""
import hashlib
import json

import pytest
from pydoc_data.topics import topics
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer, train_sentencepiece

EOS = "<|endoftext|>"
SAMPLE = "The return value is None.\n\nIt raises  ValueError\tif x < 0 — naïve café, 東京 🙂 "


def corpus(n: int = 20) -> list[str]:
    """Real English: the first `n` help topics of pydoc (sorted by name)."""
    return [topics[k] for k in sorted(topics)[:n]]


def build_bpe(path, vocab_size: int = 600) -> None:
    """A byte-level BPE tokenizer.json (Qwen-like: byte level, special tokens after the merges)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    tok.add_special_tokens([EOS, "<|im_end|>"])
    tok.save(str(path))


def build_wordlevel(path, n_words: int = 70_000) -> None:
    """A word-level tokenizer.json with `n_words` words "w0".. plus "<eos>" (ids past uint16)."""
    vocab = {f"w{i}": i for i in range(n_words)}
    vocab["<unk>"], vocab["<eos>"] = n_words, n_words + 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<eos>"])
    tok.save(str(path))


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen-like")
    build_bpe(d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS, "bos_token": None}))
    return d


def test_round_trip_and_properties(bpe_dir):
    tok = HFTokenizer(bpe_dir)
    assert tok.kind == "hf" and tok.path == bpe_dir / "tokenizer.json"
    assert tok.fingerprint == hashlib.sha256((bpe_dir / "tokenizer.json").read_bytes()).hexdigest()
    assert tok.eos_id == Tokenizer.from_file(str(tok.path)).token_to_id(EOS) == tok.vocab_size - 2
    assert tok.bos_id is None
    ids = tok.encode(SAMPLE)
    assert tok.decode(ids) == SAMPLE
    assert tok.decode(ids + [tok.eos_id]) == SAMPLE  # control tokens decode to nothing
    assert tok.encode_batch([SAMPLE, "x"], add_eos=True) == [ids + [tok.eos_id], tok.encode("x") + [tok.eos_id]]
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_eos_sources(bpe_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((bpe_dir / "tokenizer.json").read_bytes())
    with pytest.raises(ValueError, match="no EOS token known.*--eos"):
        HFTokenizer(tmp_path)
    im_end = HFTokenizer(bpe_dir, eos="<|im_end|>").eos_id
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [im_end, 0]}))
    assert HFTokenizer(tmp_path).eos_id == im_end
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": EOS}}))
    assert HFTokenizer(tmp_path).eos_id == HFTokenizer(bpe_dir).eos_id  # tokenizer_config wins
    assert HFTokenizer(tmp_path, eos=7).eos_id == 7
    with pytest.raises(ValueError, match="not in the vocabulary"):
        HFTokenizer(tmp_path, eos="<nope>")


def test_vocab_size_counts_added_tokens(tmp_path):
    build_wordlevel(tmp_path / "tokenizer.json", n_words=70_000)
    tok = HFTokenizer(tmp_path / "tokenizer.json", eos="<eos>")
    assert (tok.vocab_size, tok.eos_id) == (70_002, 70_001)
    assert tok.encode_batch(["w69999 w3"], add_eos=True) == [[69_999, 3, 70_001]]


def test_load_tokenizer_picks_the_kind(bpe_dir, tmp_path):
    sp = train_sentencepiece(corpus(), 512, tmp_path / "sp" / "tokenizer.model")
    assert isinstance(load_tokenizer(sp.path), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(tmp_path / "sp"), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(bpe_dir), HFTokenizer)
    assert isinstance(load_tokenizer(bpe_dir / "tokenizer.json"), HFTokenizer)
    assert load_tokenizer(sp.path, num_threads=1).num_threads == 1
    (tmp_path / "junk.bin").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "junk.bin", tmp_path / "missing", tmp_path / "empty"):
        with pytest.raises(FileNotFoundError, match=f"no tokenizer at {bad}"):
            load_tokenizer(bad)
    with pytest.raises(ValueError, match="drop --eos"):
        load_tokenizer(sp.path, eos="</s>")
