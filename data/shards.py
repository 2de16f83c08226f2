"""Token shards on disk: the format written by `launch/prepare_data.py` and read by the loader.

A prepared dataset is a directory:
  manifest.json                what is there (below); rewritten atomically after every shard
  shard_00000.bin, .idx, ...   the shards, in document order
  tokenizer.model              only when prepare trained the tokenizer itself

`shard_K.bin`: raw little-endian token ids, `dtype` uint16 when the vocabulary has at most 65536
entries, else uint32; the shard's documents concatenated, each followed by EOS.
`shard_K.idx`: an `.npy` file (np.save format under this name) of int64 offsets `[D + 1]` into the
shard's tokens: document d is tokens `[offsets[d], offsets[d+1])`, offsets[0] == 0,
non-decreasing, offsets[-1] == tokens in the .bin.

manifest.json:
  format, version   "spikingbrain-token-shards", 1
  complete          true only once every shard is written
  tokenizer         {kind, path, fingerprint, vocab_size, eos_id}
  dtype, domain     "uint16" | "uint32"; the domain tag of every document
  sources           descriptions of the inputs (files with sizes, or hub datasets)
  request           everything that determines the contents (a re-run must match it)
  command, cwd      the command line that made it and its directory (to resume), when known
  shards            [{name, documents, tokens, max_token_id, sha256: {bin, idx} (hex digests of
                      the two files), inputs: [first, stop) input records it covers,
                      skipped: {reason: n}, replaced: {reason: n}}]
  totals            {documents, tokens, inputs}
  skipped, replaced sums of the shards' counts by reason

Shards are written under temporary names, fsynced and renamed (.bin, then .idx), and only then
listed in the manifest, so a listed shard is always whole; a shard's files both present means it
is whole too (the manifest may lag one shard behind after a crash).

Checksums: a shard's `sha256` is computed while it is written (no second pass) and verified by
each process that opens the directory: the `.idx` at open (it is read whole there anyway, and a
damaged offset that still increases would shift document boundaries unnoticed), the `.bin` in a
background thread of the job's first rank only (hundreds of GB for a real corpus, and a random document order touches every
shard in the first steps, so checking at first use would cost as much as at open). A `.bin` that
fails makes every later `read` raise, naming the file. Manifests written before checksums existed
are read with a warning, unverified.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shlex
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from .cache import fsync_dir, write_json

FORMAT = "spikingbrain-token-shards"
VERSION = 1
MANIFEST = "manifest.json"
TMP_MARK = ".tmp-"  # temporary files are "<final name>.tmp-<pid>"
CHECKSUM = "sha256"  # a shard entry's {"bin": hex digest, "idx": hex digest}
HASH_CHUNK = 8 << 20  # bytes hashed per read when checking a .bin

log = logging.getLogger("data")


class ShardError(ValueError):
    """A prepared directory or one of its shards is missing, incomplete, corrupted or mismatched."""


def shard_dtype(vocab_size: int) -> np.dtype:
    """Token dtype of shards for a vocabulary of `vocab_size` ids (uint16 up to 65536)."""
    return np.dtype("<u2" if vocab_size <= 1 << 16 else "<u4")


def shard_name(index: int) -> str:
    return f"shard_{index:05d}"


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a prepared directory, checked for format and version."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{directory} is not a prepared token directory: no {MANIFEST} "
                         f"(make one with `python launch/prepare_data.py`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ShardError(f"{path} is unreadable ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise ShardError(f"{path} has format version {manifest.get('version')}; this code reads "
                         f"version {VERSION}: prepare the data again")
    return manifest


def write_manifest(directory: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Replace the manifest atomically (temporary file, fsync, rename, fsync the directory)."""
    directory = Path(directory)
    path = directory / MANIFEST
    tmp = path.with_name(f"{MANIFEST}{TMP_MARK}{os.getpid()}")
    write_json(tmp, manifest)
    os.replace(tmp, path)
    fsync_dir(directory)


class ShardWriter:
    """Writes one shard: `append` token chunks, then `finish` (or `abort` to leave nothing)."""

    def __init__(self, directory: Path, index: int, dtype: np.dtype) -> None:
        self.directory, self.name, self.dtype = Path(directory), shard_name(index), np.dtype(dtype)
        self._bin = self.directory / f"{self.name}.bin"
        self._tmp = self._bin.with_name(f"{self._bin.name}{TMP_MARK}{os.getpid()}")
        self._f = open(self._tmp, "wb")
        self._lengths: list[np.ndarray] = []
        self._hash = hashlib.sha256()
        self.tokens, self.max_token_id = 0, -1

    def append(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """tokens: `[N]` of the shard dtype, several documents (EOS included); lengths: `[D]`."""
        if tokens.dtype != self.dtype or int(lengths.sum()) != len(tokens):
            raise ValueError(f"{self.name}: chunk of {tokens.dtype} {len(tokens)} tokens does not "
                             f"match dtype {self.dtype} / lengths summing to {int(lengths.sum())}")
        data = memoryview(np.ascontiguousarray(tokens)).cast("B")
        self._f.write(data)
        self._hash.update(data)
        self._lengths.append(np.asarray(lengths, dtype=np.int64))
        self.tokens += len(tokens)
        if len(tokens):
            self.max_token_id = max(self.max_token_id, int(tokens.max()))

    def finish(self) -> dict[str, Any]:
        """Make the shard durable and visible; returns its manifest entry (name, counts, checksums)."""
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self._bin)
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        buffer = io.BytesIO()
        np.save(buffer, offsets)
        idx = self.directory / f"{self.name}.idx"
        tmp = idx.with_name(f"{idx.name}{TMP_MARK}{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, idx)
        fsync_dir(self.directory)
        return {"name": self.name, "documents": len(lengths), "tokens": self.tokens,
                "max_token_id": self.max_token_id,
                CHECKSUM: {"bin": self._hash.hexdigest(),
                           "idx": hashlib.sha256(buffer.getbuffer()).hexdigest()}}

    def abort(self) -> None:
        self._f.close()
        self._tmp.unlink(missing_ok=True)


def check_shard(directory: Path, entry: dict[str, Any], dtype: np.dtype) -> np.ndarray:
    """Validate one listed shard's files against each other and its manifest entry.

    Returns its offsets, int64 `[D + 1]`. Raises ShardError naming the bad file. The `.idx` is
    checked against its checksum when the entry has one; the `.bin` is not (see `check_bin`).
    """
    bin_path, idx_path = directory / f"{entry['name']}.bin", directory / f"{entry['name']}.idx"
    for p in (bin_path, idx_path):
        if not p.is_file():
            raise ShardError(f"shard file {p} is missing (listed in {directory / MANIFEST})")
    size = bin_path.stat().st_size
    if size % dtype.itemsize:
        raise ShardError(f"shard {bin_path} holds {size} bytes, not a whole number of {dtype.name} "
                         f"tokens: truncated or corrupted")
    try:
        raw = idx_path.read_bytes()
        offsets = np.load(io.BytesIO(raw), allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ShardError(f"shard index {idx_path} is unreadable (truncated or corrupted): {e}") from e
    if offsets.dtype != np.int64 or offsets.ndim != 1 or len(offsets) == 0 or offsets[0] != 0:
        raise ShardError(f"shard index {idx_path} is not int64 offsets [documents + 1] starting at 0")
    if np.any(offsets[1:] < offsets[:-1]):
        raise ShardError(f"shard index {idx_path} has decreasing offsets: corrupted")
    tokens = size // dtype.itemsize
    if offsets[-1] != tokens:
        raise ShardError(f"shard {bin_path} holds {tokens} tokens but its index {idx_path.name} "
                         f"ends at {int(offsets[-1])}: truncated or corrupted")
    if (len(offsets) - 1, tokens) != (entry["documents"], entry["tokens"]):
        raise ShardError(f"shard {bin_path} holds {len(offsets) - 1} documents / {tokens} tokens but "
                         f"the manifest says {entry['documents']} / {entry['tokens']}")
    if CHECKSUM in entry and hashlib.sha256(raw).hexdigest() != entry[CHECKSUM]["idx"]:
        raise ShardError(_mismatch(idx_path))  # e.g. a flipped bit that keeps offsets increasing
    return offsets


def check_bin(directory: Path, entry: dict[str, Any]) -> None:
    """Raise ShardError unless the shard's `.bin` matches the checksum of its manifest entry
    (one streamed pass over the file; an entry without checksums passes)."""
    if CHECKSUM not in entry:
        return
    path = directory / f"{entry['name']}.bin"
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
    except OSError as e:
        raise ShardError(f"shard file {path} is unreadable: {e}") from e
    if digest.hexdigest() != entry[CHECKSUM]["bin"]:
        raise ShardError(_mismatch(path))


def _mismatch(path: Path) -> str:
    return (f"shard file {path} does not match its checksum in {path.parent / MANIFEST}: it was "
            f"damaged or changed after preparation; prepare the data again")


class ShardSource:
    """A prepared directory as a `data.document_source.DocumentSource`.

    name defaults to the directory's name; domain, fingerprint and max_token_id come from the
    manifest; doc_lengths is int64 `[D]` over all shards in order. `read` returns a view of a
    memory-mapped shard; at most `max_open` shards stay mapped at once (each holds a file
    descriptor). Opening checks every shard's files (sizes and index, the `.idx` checksums) and
    starts checking the `.bin` checksums in a background thread (module doc; `verify` waits for
    it); the token values are checked by the loader, batch by batch.
    """

    def __init__(self, directory: str | os.PathLike, *, name: str | None = None, max_open: int = 64) -> None:
        self.directory = Path(directory)
        self.manifest = m = read_manifest(self.directory)
        if not m.get("complete"):
            command = (f"`{shlex.join(m['command'])}` in {m.get('cwd')}" if m.get("command")
                       else "the same prepare_data command")
            raise ShardError(f"{self.directory}: preparation was interrupted ({len(m['shards'])} shards "
                             f"finished); resume it by re-running {command}")
        self.name = name or self.directory.resolve().name
        self.domain: str = m["domain"]
        self.fingerprint: str = m["tokenizer"]["fingerprint"]
        self.vocab_size: int = m["tokenizer"]["vocab_size"]
        self.eos_id: int = m["tokenizer"]["eos_id"]
        self.dtype = np.dtype(m["dtype"]).newbyteorder("<")
        shards = m["shards"]
        self._names = [s["name"] for s in shards]
        offsets = [check_shard(self.directory, s, self.dtype) for s in shards]
        self.doc_lengths = np.concatenate([np.diff(o) for o in offsets] or [np.zeros(0, np.int64)])
        self._doc_start = np.concatenate([o[:-1] for o in offsets] or [np.zeros(0, np.int64)])
        self._first_doc = np.cumsum([0] + [len(o) - 1 for o in offsets])
        self.num_tokens = int(sum(int(o[-1]) for o in offsets))
        self.max_token_id = max((s["max_token_id"] for s in shards), default=-1)
        totals = m["totals"]
        if (totals["documents"], totals["tokens"]) != (len(self.doc_lengths), self.num_tokens):
            raise ShardError(f"{self.directory / MANIFEST}: totals {totals['documents']} documents / "
                             f"{totals['tokens']} tokens disagree with the shards' "
                             f"{len(self.doc_lengths)} / {self.num_tokens}")
        self._max_open = max_open
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()
        unverified = sum(CHECKSUM not in s for s in shards)
        if unverified:
            log.warning("%s: %d of %d shards have no checksums in %s (prepared by an older version): "
                        "their files are not verified; prepare the data again to add them",
                        self.directory, unverified, len(shards), MANIFEST)
        self._bad_bin: ShardError | None = None
        self._bins_checked = False
        self._start_bin_check()

    def verify(self) -> None:
        """Wait for the background check of the `.bin` checksums; raise ShardError for a bad one."""
        if self._checker is not None:
            self._checker.join()
        if self._bad_bin is not None:
            raise ShardError(str(self._bad_bin))

    def _start_bin_check(self) -> None:
        self._checker = None
        if os.environ.get("RANK", "0") != "0":
            # one process per job reads the corpus once (1024 ranks re-reading hundreds of GB
            # from shared storage would not be cheap); a damaged .bin stops rank 0, and torchrun
            # the job. The .idx is checked by every rank at open, and token ids in every batch.
            self._bins_checked = True
            return
        self._checker = threading.Thread(target=self._check_bins, daemon=True,
                                         name=f"shard-checksums-{self.name}")
        self._checker.start()

    def _check_bins(self) -> None:
        try:
            for entry in self.manifest["shards"]:
                check_bin(self.directory, entry)
        except ShardError as e:
            self._bad_bin = e
        self._bins_checked = True

    def where(self, doc: int, offset: int) -> str:
        """Where token `offset` of document `doc` is stored: shard file, its document, byte offset."""
        shard = self._shard_of(doc)
        byte = (int(self._doc_start[doc]) + offset) * self.dtype.itemsize
        return (f"{self.directory / self._names[shard]}.bin, document {doc - int(self._first_doc[shard])} "
                f"of the shard, byte offset {byte}")

    def read(self, doc: int, start: int, stop: int) -> np.ndarray:
        """Tokens `[start, stop)` of document `doc`: a read-only view of the shard, `[stop - start]`."""
        if not 0 <= doc < len(self.doc_lengths) or not 0 <= start <= stop <= self.doc_lengths[doc]:
            raise IndexError(f"{self.name}: no tokens [{start}, {stop}) in document {doc}")
        if self._bad_bin is not None:
            raise ShardError(str(self._bad_bin))
        base = int(self._doc_start[doc])
        return self._tokens(self._shard_of(doc))[base + start:base + stop]

    def _shard_of(self, doc: int) -> int:
        return int(np.searchsorted(self._first_doc, doc, side="right")) - 1

    def check_tokenizer(self, fingerprint: str) -> None:
        """Raise ShardError unless these tokens were made by the tokenizer with `fingerprint`."""
        if fingerprint != self.fingerprint:
            tok = self.manifest["tokenizer"]
            raise ShardError(
                f"{self.directory} was tokenized by another tokenizer ({tok['kind']} {tok['path']}, "
                f"fingerprint {self.fingerprint[:16]}) than the one in use (fingerprint "
                f"{fingerprint[:16]}); prepare it again with this tokenizer or train with that one")

    def _tokens(self, shard: int) -> np.ndarray:
        arr = self._maps.get(shard)
        if arr is not None:
            self._maps.move_to_end(shard)
            return arr
        path = self.directory / f"{self._names[shard]}.bin"
        if path.stat().st_size == 0:  # mmap cannot map zero bytes
            arr = np.zeros(0, self.dtype)
        else:
            arr = np.memmap(path, dtype=self.dtype, mode="r")
        self._maps[shard] = arr
        if len(self._maps) > self._max_open:
            self._maps.popitem(last=False)
        return arr

    def __getstate__(self) -> dict[str, Any]:
        # memory maps and threads are per process: a copy sent to a worker maps the files again
        # and finishes the checksum check itself
        state = self.__dict__.copy()
        state["_maps"] = OrderedDict()
        state["_checker"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if not self._bins_checked:
            self._start_bin_check()

    def __len__(self) -> int:
        return len(self.doc_lengths)

    def __repr__(self) -> str:
        return (f"ShardSource({str(self.directory)!r}, documents={len(self)}, tokens={self.num_tokens}, "
                f"domain={self.domain!r})")
