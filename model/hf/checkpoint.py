"""Hugging Face-style checkpoint directories, read and written one tensor at a time.

Reading: config.json plus safetensors (single `model.safetensors` or sharded with
`model.safetensors.index.json`) or pytorch .bin (single `pytorch_model.bin` or sharded with
`pytorch_model.bin.index.json`). Safetensors files are opened with `safe_open`, so `get(name)`
materialises only that tensor; .bin files are loaded with `mmap=True, weights_only=True` one
file at a time.

Writing: `ShardWriter` collects tensors until the next one would exceed `max_shard_size`, then
writes that shard; `finish()` names the shards `model-0000i-of-0000N.safetensors` and writes
`model.safetensors.index.json`. Callers write into a temporary directory and rename it when
complete (`atomic_output_dir`), so a half-written DST never looks complete.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil

import torch

SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json",
                   "tokenizer.model")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read (the message names the file)."""


def read_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory (expected a Hugging Face-style checkpoint)")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{cfg_path}: missing (a Hugging Face checkpoint needs config.json)")
    try:
        with open(cfg_path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: unreadable: {e}") from None


class HFCheckpoint:
    """Lazy view of a checkpoint directory: `.config`, `.keys()`, `.get(name)` -> CPU tensor."""

    def __init__(self, path: str):
        self.path = path
        self.config = read_config(path)
        self._open_name, self._open = None, None
        self._file_of = self._index()  # tensor name -> file name

    def _index(self) -> dict[str, str]:
        for single, index, kind in ((SAFE_SINGLE, SAFE_INDEX, "safetensors"), (BIN_SINGLE, BIN_INDEX, "bin")):
            self.kind = kind
            index_path = os.path.join(self.path, index)
            if os.path.isfile(index_path):
                try:
                    with open(index_path) as f:
                        weight_map = json.load(f)["weight_map"]
                except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                    raise CheckpointError(f"{index_path}: unreadable index: {e}") from None
                for fname in sorted(set(weight_map.values())):
                    if not os.path.isfile(os.path.join(self.path, fname)):
                        raise CheckpointError(f"{os.path.join(self.path, fname)}: missing "
                                              f"(listed in {index_path})")
                return dict(weight_map)
            if os.path.isfile(os.path.join(self.path, single)):
                return {name: single for name in self._file_keys(single)}
        raise CheckpointError(f"{self.path}: no weight files (expected {SAFE_SINGLE}, {SAFE_INDEX}, "
                              f"{BIN_SINGLE} or {BIN_INDEX})")

    def _file_keys(self, fname: str) -> list[str]:
        return list(self._handle(fname).keys())

    def _handle(self, fname: str):
        """Opens `fname` (keeping only one file open at a time)."""
        if self._open_name != fname:
            self._open_name, self._open = None, None
            full = os.path.join(self.path, fname)
            try:
                if self.kind == "safetensors":
                    from safetensors import safe_open
                    handle = safe_open(full, framework="pt", device="cpu")
                else:
                    handle = torch.load(full, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # noqa: BLE001 - any decoder failure means an unreadable file
                raise CheckpointError(f"{full}: unreadable weight file: {type(e).__name__}: {e}") from None
            self._open_name, self._open = fname, handle
        return self._open

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> torch.Tensor:
        return self._read(name, lambda handle: handle.get_tensor(name), lambda t: t)

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the file header (no data read)."""
        return tuple(self._read(name, lambda handle: handle.get_slice(name).get_shape(),
                                lambda t: t.shape, clone=False))

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of dim 0; a safetensors file reads only those rows' bytes."""
        return self._read(name, lambda handle: handle.get_slice(name)[start:stop], lambda t: t[start:stop])

    def _read(self, name: str, from_safetensors, from_bin, clone: bool = True):
        if name not in self._file_of:
            raise CheckpointError(f"{self.path}: tensor {name!r} not found")
        fname = self._file_of[name]
        handle = self._handle(fname)
        try:
            if self.kind == "safetensors":
                return from_safetensors(handle)
            t = from_bin(handle[name])
            return t.clone() if clone else t  # detach from the mmap'd file
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{os.path.join(self.path, fname)}: cannot read tensor {name!r}: {e}") from None


def parse_size(size) -> int:
    """'5GB', '500MB', '10KiB' or an int -> bytes (GB = 10^9, GiB = 2^30)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"--max-shard-size: cannot parse {size!r} (use e.g. 5GB, 500MB, 2GiB)")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


class ShardWriter:
    """add(name, tensor) ... finish() -> index dict. Holds at most one shard in memory."""

    def __init__(self, out_dir: str, max_shard_size=5_000_000_000, dtype: torch.dtype | None = None):
        self.out_dir, self.limit, self.dtype = out_dir, parse_size(max_shard_size), dtype
        self._buf, self._buf_bytes, self._shards, self.total_bytes = {}, 0, [], 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        tensor = tensor.detach().contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if self._buf and self._buf_bytes + nbytes > self.limit:
            self._flush()
        if name in self._buf or any(name in names for _, names in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        self._buf[name], self._buf_bytes = tensor, self._buf_bytes + nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        tmp = f"shard-{len(self._shards):05d}.tmp"
        save_safetensors(self._buf, os.path.join(self.out_dir, tmp))
        self._shards.append((tmp, list(self._buf)))
        self._buf, self._buf_bytes = {}, 0

    def finish(self) -> dict:
        if self._buf or not self._shards:
            self._flush()
        n, weight_map = len(self._shards), {}
        for i, (tmp, names) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.out_dir, tmp), os.path.join(self.out_dir, final))
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(self.out_dir, SAFE_INDEX), "w") as f:
            json.dump(index, f, indent=2)
        return index


def _umask() -> int:
    mask = os.umask(0)  # read at import, before any writer thread exists
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def save_safetensors(tensors: dict, path: str, metadata: dict | None = None) -> None:
    """safetensors' save_file, with the permissions any file gets here (0644 under the usual
    umask) instead of its private 0600, so checkpoints shared on a cluster stay readable."""
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": "pt", **(metadata or {})})
    os.chmod(path, _FILE_MODE)


def write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    return copied


def check_output_dir(dst: str, overwrite: bool = False) -> str:
    """The absolute path of output directory `dst`, after checking it may be written: an existing
    one needs `overwrite`, and its parent must exist. Commands call it before slow work too."""
    dst = os.path.abspath(dst.rstrip("/"))
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it")
    parent = os.path.dirname(dst)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{parent}: output parent directory does not exist")
    return dst


@contextlib.contextmanager
def atomic_output_dir(dst: str, overwrite: bool = False):
    """Yields a temporary sibling directory; renames it to `dst` on success, removes it on error.

    An existing `dst` without overwrite is an error raised before anything is written.
    """
    dst = check_output_dir(dst, overwrite)
    parent = os.path.dirname(dst)
    tmp = os.path.join(parent, f".{os.path.basename(dst)}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(dst):
        old = f"{tmp}.old"
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)
