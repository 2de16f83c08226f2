"""Checksums of a checkpoint's files: `manifest.json` in the checkpoint folder, written with it.

    {"algorithm": "sha256", "files": {relative path: {"bytes": N, "sha256": HEX}, ...}}

lists every other file of the checkpoint (shards, RNG states, state.json, config.yaml). Files
written from memory are hashed as they are written; the shard files of
`torch.distributed.checkpoint` are hashed right after their write, from the page cache, each by
the rank that wrote it. Verifying reads every file once (sizes are checked first, so a truncated
file is named without reading the rest); the ranks of a run share that work.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

import torch.distributed as dist

log = logging.getLogger("train")

MANIFEST = "manifest.json"


def file_entry(path: str) -> dict:
    """The manifest entry of file `path`: {"bytes", "sha256"}."""
    with open(path, "rb") as f:
        return {"bytes": os.fstat(f.fileno()).st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def write_file(path: str, data: bytes, atomic: bool = False) -> dict:
    """Writes and fsyncs `data` (under a temporary name replaced at the end if `atomic`); returns
    its manifest entry."""
    target = f"{path}.tmp{os.getpid()}" if atomic else path
    with open(target, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if atomic:
        os.replace(target, path)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_manifest(folder: str, files: dict) -> int:
    """Writes folder/manifest.json from `files` (relative path -> entry, what the ranks hashed),
    hashing any other file of `folder`; returns the bytes of all of them."""
    for parent, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(parent, name), folder)
            if rel not in files:
                files[rel] = file_entry(os.path.join(parent, name))
    write_file(os.path.join(folder, MANIFEST),
               json.dumps({"algorithm": "sha256", "files": dict(sorted(files.items()))}, indent=1).encode())
    return sum(e["bytes"] for e in files.values())


def verify_manifest(path: str, required: bool, group=None) -> int | None:
    """Checks every file of checkpoint folder `path` against its manifest; the ranks of `group`
    (None: this process alone) share the files and all raise the same ValueError, naming the
    first damaged file. Returns the checkpoint's bytes; None, with a warning, when there is no
    manifest and it is not `required` (a checkpoint written before manifests)."""
    file = os.path.join(path, MANIFEST)
    rank, size = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
    if not os.path.isfile(file):
        if required:
            raise ValueError(f"{file} is missing (its state.json says the checkpoint has one)")
        if rank == 0:
            log.warning("%s: no %s (written before checkpoints carried checksums): its files are not verified",
                        path, MANIFEST)
        return None
    try:
        with open(file) as f:
            entries = json.load(f)["files"]
        sizes = {name: int(e["bytes"]) for name, e in entries.items()}
        digests = {name: str(e["sha256"]) for name, e in entries.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{file}: cannot read the checkpoint manifest ({e!r})") from None
    mine = sorted(entries)[rank::size]
    problems = [p for p in (_size_problem(os.path.join(path, n), sizes[n]) for n in mine) if p]
    if not problems:
        problems = [f"{os.path.join(path, n)}: sha256 checksum mismatch (the file changed after it was "
                    f"written: a damaged disk or copy)" for n in mine
                    if file_entry(os.path.join(path, n))["sha256"] != digests[n]]
    problems = sorted(p for share in gather_objects(problems, group) for p in share)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"{problems[0]}{more}; use another checkpoint")
    return sum(sizes.values())


def _size_problem(file: str, size: int) -> str | None:
    if not os.path.isfile(file):
        return f"{file}: missing (the manifest lists it)"
    found = os.path.getsize(file)
    return None if found == size else f"{file}: {found} bytes, the manifest says {size} (truncated or copied incompletely)"


def gather_objects(obj, group) -> list:
    """Every rank's `obj` of `group`, in rank order ([obj] without a group)."""
    if group is None:
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out
