"""Build-once cache directories that appear atomically.

A cache entry is a directory that is either complete or absent: it is built under a temporary
name next to its final place and renamed into place when done, so an interrupted build or a
rank that crashed mid-write never leaves something that looks complete; the next build removes
such leftovers. A lock file makes concurrent ranks on one filesystem wait for the first builder
instead of building again; where locking is unavailable the rename alone still keeps the cache
correct (one builder wins).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: rely on the atomic rename alone
    fcntl = None


def build_once(final: Path, build: Callable[[Path], None]) -> bool:
    """Make sure directory `final` exists, calling `build(tmp_dir)` to fill it if it does not.

    `build` writes every file of the entry into `tmp_dir`. Returns True if this call built it.
    """
    if final.is_dir():
        return False
    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final.parent / f".{final.name}.lock"):
        if final.is_dir():  # another process built it while we waited
            return False
        if fcntl is not None:  # without locks a temporary may belong to a build in progress
            _remove_stale_temporaries(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            build(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
            fsync_dir(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():
                    raise
                return False  # lost a race with a builder that could not lock
            fsync_dir(final.parent)
            return True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_temporaries(final: Path) -> None:
    """Removes the temporaries of builds killed before their rename, next to `final`: its own
    (the caller holds its lock, so no other build of it runs) and those of other entries whose
    lock nobody holds (held while removing, so no build of them can start meanwhile)."""
    for tmp in final.parent.iterdir():
        name, sep, _ = tmp.name[1:].rpartition(".tmp-")
        if not (tmp.name.startswith(".") and sep and tmp.is_dir()):
            continue
        if name == final.name:
            shutil.rmtree(tmp, ignore_errors=True)
            continue
        with open(final.parent / f".{name}.lock", "a") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # being built now
                continue
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as indented JSON and fsync it."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def fsync_dir(path: Path) -> None:
    """fsync a directory entry so a rename survives a crash (best effort where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
