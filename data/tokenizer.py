"""Tokenizers: a small common interface, sentencepiece and Hugging Face `tokenizer.json`
implementations, `load_tokenizer` to pick one by path, and a sentencepiece trainer."""

from __future__ import annotations

import hashlib
import io
import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm


class Tokenizer(ABC):
    """Text <-> token ids. `fingerprint` identifies the exact vocabulary (sha256 hex of the model
    file), so caches and checkpoints can tell whether tokens were made by this tokenizer."""

    kind: str  # "sentencepiece" | "hf": recorded with everything derived from the tokenizer
    path: Path  # the file the vocabulary was read from (what `fingerprint` hashes)
    vocab_size: int
    eos_id: int
    bos_id: int | None
    fingerprint: str

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; control tokens (BOS/EOS) decode to nothing."""

    def encode_batch(self, texts: Sequence[str], *, add_eos: bool = False) -> list[list[int]]:
        """`encode` for many texts, optionally appending EOS to each."""
        tail = [self.eos_id] if add_eos else []
        return [self.encode(t) + tail for t in texts]


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model file (`.model`). `num_threads`: threads of `encode_batch`."""

    kind = "sentencepiece"

    def __init__(self, path: str | os.PathLike, *, num_threads: int = 2) -> None:
        self.path = Path(path)
        self.num_threads = num_threads
        if not self.path.is_file():
            raise FileNotFoundError(f"sentencepiece model not found: {self.path}")
        proto = self.path.read_bytes()
        self.fingerprint = hashlib.sha256(proto).hexdigest()
        self._sp = spm.SentencePieceProcessor(model_proto=proto)
        self.vocab_size = int(self._sp.get_piece_size())
        self.eos_id = int(self._sp.eos_id())
        bos = int(self._sp.bos_id())
        self.bos_id = bos if bos >= 0 else None
        if self.eos_id < 0:
            raise ValueError(f"sentencepiece model {self.path} has no EOS token; packing needs one")

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str], *, add_eos: bool = False) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int, add_eos=add_eos, num_threads=self.num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`, given as the file or a checkpoint directory holding it
    (e.g. Qwen's). EOS: `eos` (a token string or id) if given, else `eos_token` of the directory's
    tokenizer_config.json, else `eos_token_id` of its config.json / generation_config.json.
    `vocab_size` is one past the largest id, added tokens included, so every id is below it.
    `fingerprint` is the sha256 of the tokenizer.json bytes. `encode_batch` runs in Rust, over
    several threads unless TOKENIZERS_PARALLELISM=false.
    """

    kind = "hf"

    def __init__(self, path: str | os.PathLike, *, eos: str | int | None = None) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        path = Path(path)
        self.path = path / "tokenizer.json" if path.is_dir() else path
        if not self.path.is_file():
            raise FileNotFoundError(f"Hugging Face tokenizer not found: {self.path}")
        raw = self.path.read_bytes()
        self.fingerprint = hashlib.sha256(raw).hexdigest()
        self._tok = _Tokenizer.from_str(raw.decode("utf-8"))
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        folder = self.path.parent
        tok_cfg = _read_json(folder / "tokenizer_config.json")
        self.eos_id = self._eos_id(eos, tok_cfg, folder)
        self.bos_id = self._token_id(tok_cfg.get("bos_token"))

    def _eos_id(self, eos: str | int | None, tok_cfg: dict, folder: Path) -> int:
        if eos is not None:
            found = self._token_id(eos)
            if found is None:
                raise ValueError(f"EOS token {eos!r} is not in the vocabulary of {self.path}")
            return found
        found = self._token_id(tok_cfg.get("eos_token"))
        for name in ("config.json", "generation_config.json"):
            if found is None:
                ids = _read_json(folder / name).get("eos_token_id")
                found = self._token_id(ids[0] if isinstance(ids, list) and ids else ids)
        if found is None:
            raise ValueError(f"no EOS token known for {self.path}: none in tokenizer_config.json, "
                             f"config.json or generation_config.json next to it; name one (--eos)")
        return found

    def _token_id(self, token: str | int | dict | None) -> int | None:
        if isinstance(token, dict):  # {"content": "<|endoftext|>", ...} in older configs
            token = token.get("content")
        if isinstance(token, bool) or token is None:
            return None
        if isinstance(token, int):
            return token if 0 <= token < self.vocab_size else None
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], *, add_eos: bool = False) -> list[list[int]]:
        encoded = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        if add_eos:
            return [e.ids + [self.eos_id] for e in encoded]
        return [e.ids for e in encoded]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def load_tokenizer(path: str | os.PathLike, *, eos: str | int | None = None,
                   num_threads: int = 2) -> Tokenizer:
    """The tokenizer at `path`: a sentencepiece `.model` file, or a Hugging Face `tokenizer.json`
    (the file or a directory holding it). `eos` overrides a Hugging Face tokenizer's EOS;
    `num_threads` sets a sentencepiece tokenizer's batch threads."""
    p = Path(path)
    if p.is_file() and p.suffix == ".model":
        if eos is not None:
            raise ValueError(f"{p}: the EOS of a sentencepiece model is fixed by the model; drop --eos")
        return SentencePieceTokenizer(p, num_threads=num_threads)
    if (p.is_file() and p.suffix == ".json") or (p / "tokenizer.json").is_file():
        return HFTokenizer(p, eos=eos)
    if p.is_dir() and (p / "tokenizer.model").is_file():
        return load_tokenizer(p / "tokenizer.model", eos=eos, num_threads=num_threads)
    raise FileNotFoundError(
        f"no tokenizer at {p}: expected a sentencepiece .model file, a Hugging Face tokenizer.json, "
        f"or a directory holding tokenizer.json or tokenizer.model")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    return data if isinstance(data, dict) else {}


def train_sentencepiece(
    texts: Iterable[str],
    vocab_size: int,
    out_path: str | os.PathLike,
    *,
    max_sentences: int = 300_000,
) -> SentencePieceTokenizer:
    """Train a unigram sentencepiece model on `texts` and write it atomically to `out_path`.

    Text is kept verbatim (identity normalisation, whitespace preserved, "\\n" is a piece) and
    byte fallback is on, so every string encodes and `decode(encode(s)) == s`. Each text is fed
    to the trainer line by line; at most `max_sentences` lines are sampled (with a fixed seed,
    so the same input gives the same model bytes). Ids: 0 unk, 1 bos, 2 eos, no pad.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(0x5B)  # the trainer samples/shuffles input sentences
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(texts),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="unigram",
        byte_fallback=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=["\n"],
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        max_sentence_length=16384,
        num_threads=2,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,  # errors only: the trainer is chatty at INFO
    )
    tmp = out_path.with_name(f"{out_path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_path)
    return SentencePieceTokenizer(out_path)


def _lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line
