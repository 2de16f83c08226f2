"""Text -> shards (data.prepare) -> the loader from a DataConfig -> the same texts."""
import json

import numpy as np
import pytest

from data import DataConfig, Loader
from data.prepare import prepare_shards
from data.shards import ShardSource
from data.tokenizer import train_sentencepiece
from tests.data.synthetic import epoch_tokens

TEXTS = {
    "web": [f"Web page {i}: the quick brown fox jumps over the lazy dog {i * 7} times." for i in range(60)],
    "code": [f"def f{i}(x):\n    return x * {i} + {i % 5}\n" for i in range(40)],
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, demo_data):
    root = tmp_path_factory.mktemp("shards")
    out = {}
    for name, texts in TEXTS.items():
        src = root / f"{name}.jsonl"
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        prepare_shards([str(src)], root / name, tokenizer=demo_data.tokenizer.path, domain=name,
                       docs_per_shard=16, progress=False)
        out[name] = root / name
    return out


def decode_documents(tokens, tokenizer):
    """Split a token stream at EOS and decode each document."""
    ends = np.flatnonzero(tokens == tokenizer.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokenizer.decode(tokens[a:b].tolist()) for a, b in zip(starts, ends)]


def test_text_to_batches_round_trip(prepared, demo_data):
    cfg = DataConfig(name="shards", seq_len=32, tokenizer=str(demo_data.tokenizer.path),
                     sources=[{"path": str(prepared["web"]), "weight": 1},
                              {"path": str(prepared["code"]), "weight": 1}])
    loader = Loader(cfg, seed=0, global_batch=4)
    assert [s.name for s in loader.sources] == ["web", "code"]
    total = sum(int(s.doc_lengths.sum()) for s in loader.sources)
    steps = 3 * -(-total // loader.tokens_per_step)  # over an epoch of each source
    stream = np.concatenate([loader.next_batch()["input_ids"].flatten().numpy() for _ in range(steps)])
    tok = demo_data.tokenizer
    docs = decode_documents(stream, tok)  # the complete documents
    for source in loader.sources:  # each source: every text once per epoch, in its stream order
        mine = [d for d in docs if d in TEXTS[source.name]]
        n = len(TEXTS[source.name])
        first = decode_documents(epoch_tokens(source, 0, 0), tok)
        assert len(mine) > n and mine[:n] == first and sorted(first) == sorted(TEXTS[source.name])
    loader.check_vocab(tok.vocab_size)


def test_single_path_and_domain_packing(prepared):
    cfg = DataConfig(name="shards", seq_len=16, packing="domain",
                     sources=[{"path": str(prepared["web"]), "name": "w"}, {"path": str(prepared["code"])}])
    loader = Loader(cfg, seed=0, global_batch=8)
    assert [(s.name, s.domain) for s in loader.sources] == [("w", "web"), ("code", "code")]
    loader.next_batch()
    one = Loader(DataConfig(name="shards", seq_len=16, path=str(prepared["code"])), seed=0, global_batch=2)
    assert one.next_batch()["input_ids"].shape == (2, 16)


def test_other_tokenizer_is_refused(prepared, demo_data, tmp_path):
    other = train_sentencepiece(TEXTS["web"] * 20, 300, tmp_path / "other.model")
    src = tmp_path / "more.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS["web"]))
    prepare_shards([str(src)], tmp_path / "more", tokenizer=other.path, progress=False)
    mixed = DataConfig(name="shards", sources=[{"path": str(prepared["web"])}, {"path": str(tmp_path / "more")}])
    with pytest.raises(ValueError, match=r"data\.sources\[1\]: data source 'more' was tokenized by another"):
        Loader(mixed, seed=0, global_batch=1)
    told = DataConfig(name="shards", path=str(prepared["web"]), tokenizer=str(other.path))
    with pytest.raises(ValueError, match=r"data\.path: .*another tokenizer"):
        Loader(told, seed=0, global_batch=1)
    with pytest.raises(ValueError, match=r"data\.tokenizer"):
        Loader(DataConfig(name="shards", path=str(prepared["web"]), tokenizer=str(tmp_path / "none.model")),
               seed=0, global_batch=1)


def test_token_ids_beyond_the_model_vocab(prepared):
    loader = Loader(DataConfig(name="shards", path=str(prepared["web"])), seed=0, global_batch=1)
    top = ShardSource(prepared["web"]).max_token_id
    loader.check_vocab(top + 1)
    with pytest.raises(ValueError, match=rf"'web' holds token id {top} but model.vocab_size is {top}"):
        loader.check_vocab(top)
