import hashlib

import pytest

from data import SentencePieceTokenizer, train_sentencepiece
from data.demo import demo_documents

SAMPLE = (
    "The return value is None.\n\nIt raises  ValueError\tif x < 0 —"
    " naïve café, 東京, emoji 🙂, and a trailing space "
)


@pytest.fixture(scope="module")
def corpus():
    return demo_documents(60_000)


def test_round_trip(demo_data):
    tok = demo_data.tokenizer
    ids = tok.encode(SAMPLE)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == SAMPLE
    assert tok.decode(ids + [tok.eos_id]) == SAMPLE  # control tokens decode to nothing
    assert tok.encode_batch([SAMPLE, "x"], add_eos=True) == [ids + [tok.eos_id], tok.encode("x") + [tok.eos_id]]


def test_properties(demo_data):
    tok = demo_data.tokenizer
    assert tok.vocab_size == 512
    assert (tok.eos_id, tok.bos_id) == (2, 1)
    assert tok.fingerprint == hashlib.sha256(tok.path.read_bytes()).hexdigest()
    assert SentencePieceTokenizer(tok.path).fingerprint == tok.fingerprint


def test_training_is_deterministic_and_atomic(corpus, tmp_path):
    a = train_sentencepiece(corpus, 400, tmp_path / "a" / "tok.model")
    b = train_sentencepiece(iter(corpus), 400, tmp_path / "b" / "tok.model")
    assert a.fingerprint == b.fingerprint
    assert a.vocab_size == 400
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["tok.model"]


def test_training_is_quiet(corpus, tmp_path, capfd):
    train_sentencepiece(corpus, 400, tmp_path / "tok.model")
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        SentencePieceTokenizer(tmp_path / "nope.model")
