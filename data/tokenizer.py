"""Tokenizers: a small common interface, the sentencepiece implementation, and its trainer."""

from __future__ import annotations

import hashlib
import io
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm


class Tokenizer(ABC):
    """Text <-> token ids. `fingerprint` identifies the exact vocabulary (sha256 hex of the model
    file), so caches and checkpoints can tell whether tokens were made by this tokenizer."""

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
    """A sentencepiece model file (`.model`)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
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
        return self._sp.encode(list(texts), out_type=int, add_eos=add_eos, num_threads=2)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


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
