"""Text -> token shards: the library behind `launch/prepare_data.py` (format: `data/shards.py`).

Input records (see `data.text_sources`) are cut into shards by position: shard k always covers
records `[k * docs_per_shard, (k + 1) * docs_per_shard)`, whatever was skipped among them, so a
re-run knows exactly where the finished shards end. The main process reads and writes; with
`num_proc > 1`, chunks of documents are tokenized by worker processes and their results taken back
strictly in submission order, so the output bytes never depend on `num_proc`.

A re-run with the same request (inputs and their sizes, settings, tokenizer) resumes after the
last finished shard: it reads, but does not tokenize, the records already covered. A different
request into a non-empty directory is refused; `overwrite` discards the manifest and shards the
directory holds (other files are left alone) and starts over.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .shards import (FORMAT, MANIFEST, TMP_MARK, VERSION, ShardError, ShardWriter, check_shard,
                     read_manifest, shard_dtype, write_manifest)
from .text_sources import TextReader
from .tokenizer import SentencePieceTokenizer, Tokenizer, load_tokenizer, train_sentencepiece

DOCS_PER_SHARD = 100_000
CHUNK_CHARS = 1 << 20  # characters per task sent to a worker: large enough to amortise pickling
TRAINED_TOKENIZER = "tokenizer.model"


@dataclass
class PrepareResult:
    """What a `prepare_shards` call did: `manifest` is the final manifest of `directory`."""

    directory: Path
    manifest: dict[str, Any]
    new_shards: int
    reused_shards: int
    documents: int  # documents tokenized by this call
    tokens: int
    seconds: float


@dataclass
class _Chunk:
    shard: int
    texts: list[str]
    end: dict[str, Any] | None = None  # set on a shard's last chunk: its inputs and skip counts


def prepare_shards(
    inputs: Sequence[str],
    output: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    train_vocab: int | None = None,
    eos: str | int | None = None,
    text_field: str = "text",
    text_mode: str = "document",
    input_format: str | None = None,
    split: str = "train",
    invalid_utf8: str = "replace",
    domain: str = "default",
    docs_per_shard: int = DOCS_PER_SHARD,
    num_proc: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    command: Sequence[str] | None = None,
) -> PrepareResult:
    """Tokenize `inputs` into token shards in `output` (created if needed).

    Exactly one of `tokenizer` (a path for `load_tokenizer`; `eos` overrides a Hugging Face
    tokenizer's EOS) and `train_vocab` (train a sentencepiece model of that size on the inputs
    first, stored as `output/tokenizer.model`) is required. The text settings are those of
    `TextReader`. `command` is recorded so an interrupted run can say how to resume.
    """
    start_time = time.perf_counter()
    if (tokenizer is None) == (train_vocab is None):
        raise ValueError("give exactly one of a tokenizer (--tokenizer) or a vocabulary size to train "
                         "one (--train-tokenizer)")
    for setting, value in (("--num-proc", num_proc), ("--docs-per-shard", docs_per_shard)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{setting} must be a positive integer, got {value!r}")
    reader = TextReader(inputs, text_field=text_field, text_mode=text_mode, invalid_utf8=invalid_utf8,
                        input_format=input_format, split=split)
    out = Path(output)
    tok = load_tokenizer(tokenizer, eos=eos, num_threads=1) if tokenizer is not None else None
    request = _jsonable({
        "sources": reader.describe(), "text_field": text_field, "text_mode": text_mode,
        "input_format": input_format, "split": split, "invalid_utf8": invalid_utf8, "domain": domain,
        "docs_per_shard": docs_per_shard,
        "tokenizer": ({"fingerprint": tok.fingerprint, "eos_id": tok.eos_id} if tok
                      else {"train_vocab": train_vocab}),
    })
    manifest = _existing(out, request, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"*{TMP_MARK}*"):  # left by a killed run; never part of the dataset
        stale.unlink()
    if manifest is None:
        manifest = {"format": FORMAT, "version": VERSION, "complete": False, "request": request,
                    "sources": request["sources"], "domain": domain, "tokenizer": None, "dtype": None,
                    "command": list(command) if command else None, "cwd": os.getcwd(), "shards": []}
        write_manifest(out, manifest)  # marks the directory as ours before anything else lands
    if tok is None:
        tok = _trained_tokenizer(out, manifest, reader, train_vocab, progress)
    info = {"kind": tok.kind, "path": str(tok.path.resolve()), "fingerprint": tok.fingerprint,
            "vocab_size": tok.vocab_size, "eos_id": tok.eos_id}
    old = manifest["tokenizer"]
    if old is None or (old["fingerprint"], old["eos_id"]) != (tok.fingerprint, tok.eos_id):
        # only a retrained tokenizer can differ here (the request pins a given one): the
        # shards it did not make are foreign
        _remove_shards(out, 0)
        manifest["shards"] = []
    manifest.update(tokenizer=info, dtype=shard_dtype(tok.vocab_size).name)
    dtype = shard_dtype(tok.vocab_size)
    for entry in manifest["shards"]:
        try:
            check_shard(out, entry, dtype)
        except ShardError as e:
            raise ShardError(f"{e}; it was finished by an earlier run: re-run with --overwrite to "
                             f"start over") from e
    reused = len(manifest["shards"])
    _remove_shards(out, reused)  # a crash may have left later shards without a manifest entry
    _update_totals(manifest)
    write_manifest(out, manifest)
    docs = tokens = 0
    if not manifest["complete"]:
        first = manifest["shards"][-1]["inputs"][1] if reused else 0
        if reused and progress:
            print(f"resuming after {reused} finished shards ({first} input records)", file=sys.stderr)
        docs, tokens = _run(reader.records(), first, reused, docs_per_shard, num_proc, tok, dtype, out,
                            manifest, progress)
        manifest["complete"] = True
        write_manifest(out, manifest)
    return PrepareResult(out, manifest, len(manifest["shards"]) - reused, reused, docs, tokens,
                         time.perf_counter() - start_time)


def _run(records, first: int, shard: int, per_shard: int, num_proc: int, tok: Tokenizer,
         dtype: np.dtype, out: Path, manifest: dict, progress: bool) -> tuple[int, int]:
    """Tokenize and write the shards from `shard` on; returns (documents, tokens) written."""
    from tqdm import tqdm

    pool = None
    if num_proc > 1:
        # fork: workers start at once and share the loaded modules; spawn where fork is missing
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        eos = tok.eos_id if tok.kind == "hf" else None  # an overridden EOS must reach the workers
        pool = ctx.Pool(num_proc, _init_worker, (str(tok.path), eos, dtype.str))
    else:
        _set_worker_state(tok, dtype)
    pending: deque = deque()
    writer: ShardWriter | None = None
    docs = tokens = 0
    bar = tqdm(desc="tokenizing", unit="doc", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter()

    def drain_one() -> None:
        nonlocal writer, docs, tokens
        chunk, result = pending.popleft()
        toks, lengths = result.get() if pool is not None else result
        if writer is None:
            writer = ShardWriter(out, chunk.shard, dtype)
        writer.append(toks, lengths)
        docs, tokens = docs + len(lengths), tokens + len(toks)
        bar.update(len(lengths))
        bar.set_postfix_str(f"{tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s", refresh=False)
        if chunk.end is not None:
            entry = writer.finish()
            writer = None
            manifest["shards"].append({**entry, **chunk.end})
            _update_totals(manifest)
            write_manifest(out, manifest)

    try:
        for chunk in _chunks(records, first, shard, per_shard):
            if pool is not None:
                pending.append((chunk, pool.apply_async(_encode, (chunk.texts,))))
            else:
                pending.append((chunk, _encode(chunk.texts)))
            # bounded: reading never runs far ahead of the workers (nor at all without them)
            while len(pending) > (2 * num_proc if pool is not None else 0):
                drain_one()
        while pending:
            drain_one()
    finally:
        bar.close()
        if writer is not None:
            writer.abort()
        if pool is not None:
            pool.terminate()
            pool.join()
    return docs, tokens


def _chunks(records: Iterator, first: int, shard: int, per_shard: int) -> Iterator[_Chunk]:
    """Documents of the shards from `shard` on, in chunks; records before `first` are skipped."""
    records = iter(records)
    if first and sum(1 for _ in itertools.islice(records, first)) < first:
        raise ShardError(f"the input now has fewer than the {first} records already prepared; it "
                         f"changed since: re-run with --overwrite")
    while True:
        texts: list[str] = []
        chars = n = 0
        skipped: Counter = Counter()
        replaced: Counter = Counter()
        for text, reason in itertools.islice(records, per_shard):
            n += 1
            if text is None:
                skipped[reason] += 1
                continue
            if reason is not None:
                replaced[reason] += 1
            texts.append(text)
            chars += len(text)
            if chars >= CHUNK_CHARS:
                yield _Chunk(shard, texts)
                texts, chars = [], 0
        if n == 0:
            return
        yield _Chunk(shard, texts, {"inputs": [first, first + n], "skipped": dict(sorted(skipped.items())),
                                    "replaced": dict(sorted(replaced.items()))})
        if n < per_shard:
            return
        first, shard = first + n, shard + 1


_TOKENIZER: Tokenizer | None = None
_DTYPE: np.dtype | None = None


def _init_worker(path: str, eos: int | None, dtype: str) -> None:
    # One thread per process: parallelism comes from --num-proc, so the cores are not oversubscribed.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _set_worker_state(load_tokenizer(path, eos=eos, num_threads=1), np.dtype(dtype))


def _set_worker_state(tok: Tokenizer, dtype: np.dtype) -> None:
    global _TOKENIZER, _DTYPE
    _TOKENIZER, _DTYPE = tok, dtype


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """texts -> (tokens `[N]` of the shard dtype, each document followed by EOS; lengths `[D]`)."""
    ids = _TOKENIZER.encode_batch(texts, add_eos=True)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=_DTYPE, count=int(lengths.sum()))
    return tokens, lengths


def _existing(out: Path, request: dict, overwrite: bool) -> dict | None:
    """The manifest to continue from, or None to start afresh (clearing old shards if allowed)."""
    if not out.exists() or (out.is_dir() and all(TMP_MARK in p.name for p in out.iterdir())):
        return None  # absent, empty, or only a killed run's temporary files
    if not out.is_dir():
        raise ValueError(f"--output {out} exists and is not a directory")
    if not (out / MANIFEST).is_file():
        if not overwrite:
            raise ValueError(f"--output {out} exists, is not empty and holds no prepared data; choose "
                             f"another directory or pass --overwrite")
        _remove_shards(out, 0)
        return None
    if not overwrite:
        try:
            manifest = read_manifest(out)
            if manifest.get("request") == request:
                return manifest
            if not manifest.get("shards"):
                # an earlier run failed before producing anything (e.g. a wrong --text-field):
                # the corrected command may take the directory over
                (out / MANIFEST).unlink()
                return None
            differs = sorted(k for k in request if manifest.get("request", {}).get(k) != request[k])
        except ShardError:
            differs = ["manifest unreadable"]
        raise ValueError(f"--output {out} holds data prepared from other inputs or settings (differs "
                         f"in: {', '.join(differs)}); pass --overwrite to replace it, or choose another "
                         f"directory")
    (out / MANIFEST).unlink()  # first, so an interrupted clean-up never leaves a stale listing
    _remove_shards(out, 0)
    # a trained tokenizer.model stays: training again replaces it, and it may be the --tokenizer
    return None


def _remove_shards(out: Path, first: int) -> None:
    """Delete shard files numbered `first` and up (never listed in the manifest)."""
    for path in out.glob("shard_*"):
        stem = path.name.split(".", 1)[0]
        if stem[6:].isdigit() and int(stem[6:]) >= first:
            path.unlink()


def _trained_tokenizer(out: Path, manifest: dict, reader: TextReader, vocab: int,
                       progress: bool) -> SentencePieceTokenizer:
    path = out / TRAINED_TOKENIZER
    if path.is_file() and manifest["tokenizer"] is not None:
        tok = SentencePieceTokenizer(path, num_threads=1)
        if tok.fingerprint == manifest["tokenizer"]["fingerprint"]:
            return tok
    if progress:
        print(f"training a sentencepiece tokenizer (vocab {vocab}) on the inputs", file=sys.stderr)
    try:
        train_sentencepiece(reader.documents(), vocab, path)
    except RuntimeError as e:
        raise ValueError(f"training the tokenizer failed ({e}); --train-tokenizer {vocab} may be too "
                         f"large for this corpus") from e
    return SentencePieceTokenizer(path, num_threads=1)


def _update_totals(manifest: dict) -> None:
    shards = manifest["shards"]
    manifest["totals"] = {k: sum(s[k] for s in shards) for k in ("documents", "tokens")}
    manifest["totals"]["inputs"] = shards[-1]["inputs"][1] if shards else 0
    for key in ("skipped", "replaced"):
        total: Counter = Counter()
        for s in shards:
            total.update(s[key])
        manifest[key] = dict(sorted(total.items()))


def _jsonable(obj: Any) -> Any:
    """As it will read back from manifest.json (tuples become lists), for comparisons."""
    return json.loads(json.dumps(obj))
