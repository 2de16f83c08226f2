"""Training checkpoints: complete-or-ignored directories written in the background, and resume.

Layout (read by `train.export` too)::

    run_dir/checkpoints/step_00000100/
        shards/             `torch.distributed.checkpoint` folder: every rank writes the rows it
                            owns of the model (`model.<name>`, fp32, our parameter names) and of
                            the AdamW state (`optim.*`); `.metadata` (global shapes and where each
                            row range lives) is written last. Any data-parallel size or ZeRO stage
                            can read it back: each rank reads only the rows it owns.
        rng_rank{r}.pt      each rank's python, numpy, torch CPU (and CUDA) RNG states
        state.json          format, version, step, tokens_seen, skipped_steps, loader, world_size,
                            dp, zero_stage, time, log_window (the partly filled logging window),
                            manifest (the name of the manifest, which checkpoints before it lack),
                            faults (spike window, spike and in-a-row counts, rollbacks: train.faults)
        config.yaml         the resolved RunConfig
        manifest.json       {"algorithm": "sha256", "files": {relative path: {"bytes", "sha256"}}}
                            for every other file, verified at resume and export
    run_dir/checkpoints/latest   name of the newest complete checkpoint, rewritten last

Every rank writes its files into `step_NNNNNNNN.tmp-<nonce>` (nonce chosen by rank 0 and
broadcast), fsyncs and hashes them (its own files, from the page cache) and meets the others in
an exchange of the outcomes and checksums; rank 0 then writes the manifest, renames the folder,
fsyncs the parent and atomically replaces `latest`. A crash anywhere leaves the previous `latest`
valid; leftover `.tmp-*` folders are never read and are removed by the next save. A failed write
(a full disk) removes its temporary folder and stops the run with a `TrainingError` naming the
disk, the checkpoint and the size it needs.
"""
from __future__ import annotations

import dataclasses
import errno
import io
import json
import logging
import os
import random
import shutil
import threading
import time
import uuid
import warnings
from collections.abc import Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
import yaml
from torch.distributed.checkpoint.staging import BlockingAsyncStager
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from parallel import comm
from parallel.materialize import local
from .errors import TrainingError
from .manifest import MANIFEST, file_entry, gather_objects, verify_manifest, write_file, write_manifest

log = logging.getLogger("train")
# a world of one saves and loads without a process group on purpose
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

FORMAT, VERSION = "spikingbrain-checkpoint", 2
SHARDS_DIR, STATE_FILE, CONFIG_FILE, LATEST = "shards", "state.json", "config.yaml", "latest"
METADATA = os.path.join(SHARDS_DIR, ".metadata")  # written last by torch.distributed.checkpoint
REQUIRED = (METADATA, STATE_FILE, CONFIG_FILE)


def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def latest_checkpoint(run_dir: str) -> str | None:
    """The checkpoint `latest` names, or None when the run has no complete checkpoint yet."""
    folder = checkpoints_dir(run_dir)
    try:
        with open(os.path.join(folder, LATEST)) as f:
            name = f.read().strip()
    except FileNotFoundError:
        return None
    return os.path.join(folder, name)


def read_state(path: str) -> dict:
    """The state.json of checkpoint `path`; ValueError naming the file when unreadable."""
    file = os.path.join(path, STATE_FILE)
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: cannot read the checkpoint state ({e})") from None


def verify_checkpoint(path: str, group=None) -> int | None:
    """Checks every file of checkpoint `path` against its manifest (`train.manifest`); returns its
    size in bytes (None for a checkpoint written before manifests)."""
    required = os.path.isfile(os.path.join(path, STATE_FILE)) and bool(read_state(path).get("manifest"))
    return verify_manifest(path, required, group)


def complete_checkpoints(run_dir: str) -> list[str]:
    """Names of the complete checkpoints (no temporaries), oldest first."""
    folder = checkpoints_dir(run_dir)
    if not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder)
                  if n.startswith("step_") and ".tmp-" not in n and os.path.isdir(os.path.join(folder, n)))


# ---------------------------------------------------------------------------------------------
# Staging (synchronous, main thread): everything copied to CPU memory so training can go on.


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def seed_rng(seed: int, step: int, rank: int) -> None:
    """RNG for a rank the checkpoint has no state for (resume on more ranks): from (seed, step, rank)."""
    derived = (seed * 1_000_003 + step) * 1_009 + rank
    random.seed(derived)
    np.random.seed(derived % 2**32)
    torch.manual_seed(derived)


def sharded_state(model: torch.nn.Module, optimizer) -> dict:
    """{"model": ..., "optim": ...} keyed by parameter name, with this rank's shards (DTensors
    under the sharded engine, plain tensors in a world of one): what `shards/` holds."""
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}


class CheckpointTensors(Mapping):
    """The full model tensors of a checkpoint's `shards/` (our parameter names), read one tensor at
    a time on access, in a single process (exports, evaluation)."""

    def __init__(self, path: str):
        self.folder = os.path.join(path, SHARDS_DIR)
        try:
            self._reader = dcp.FileSystemReader(self.folder)
            meta = self._reader.read_metadata().state_dict_metadata
        except (Exception, CheckpointException) as e:  # missing or damaged .metadata
            raise ValueError(f"{os.path.join(path, METADATA)}: cannot read the checkpoint index ({e})") from None
        self._shapes = {k[len("model."):]: (tuple(v.size), v.properties.dtype) for k, v in meta.items()
                        if k.startswith("model.") and hasattr(v, "size")}

    def __getitem__(self, name: str) -> torch.Tensor:
        shape, dtype = self._shapes[name]
        out = torch.empty(shape, dtype=dtype)
        try:
            dcp.load({"model": {name: out}}, storage_reader=self._reader, no_dist=True)
        except (Exception, CheckpointException) as e:  # a damaged or missing shard file
            raise ValueError(f"{self.folder}: cannot read tensor {name} ({e})") from None
        return out

    def __iter__(self):
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)


def stage(trainer, model: torch.nn.Module) -> dict:
    """Copies (in CPU memory) of everything a checkpoint holds. model: the plain model."""
    mesh, cfg = trainer.mesh, trainer.cfg
    staged = {"step": trainer.step, "rank": mesh.rank, "rng": rng_state(),
              "shards": trainer.checkpointer.stager.stage(sharded_state(model, trainer.optimizer))}
    window = trainer.log_window()  # on every rank: the expert load is summed over them
    if mesh.is_main:
        staged["state"] = {"format": FORMAT, "version": VERSION, "step": trainer.step,
                           "tokens_seen": trainer.tokens_seen, "skipped_steps": trainer.skipped_steps,
                           "loader": trainer.loader.state_dict(), "world_size": mesh.world_size,
                           "dp": mesh.dp, "zero_stage": mesh.zero_stage, "time": time.time(),
                           "log_window": window, "manifest": MANIFEST, "faults": trainer.faults.state_dict()}
        staged["config"] = yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
    return staged


# ---------------------------------------------------------------------------------------------
# Writing (background thread).


class Checkpointer:
    """Saves staged state in a background thread; `wait()` joins the write in flight.

    The thread talks to the other ranks over its own gloo group, so its collectives never
    interleave with the training collectives of the main thread.
    """

    def __init__(self, run_dir: str, mesh, keep: int):
        self.folder, self.mesh, self.keep = checkpoints_dir(run_dir), mesh, keep
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        # on CUDA the staging buffers are pinned and reused by every save (one shard of host memory)
        self.stager = BlockingAsyncStager(cache_staged_state_dict=mesh.device.type == "cuda")
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_saved_step: int | None = None
        self.last_write_s: float | None = None  # how long the newest write took (staged -> committed)
        # bytes of the newest checkpoint written or resumed (rank 0): what the next save needs
        self.last_bytes: int | None = None

    def save(self, stage_fn, blocking: bool = False) -> None:
        """stage_fn() -> the staged state (see `stage`); called only once the previous write is
        done, since staging reuses that write's buffers. A disk without room for the checkpoint
        (when its size is known) raises TrainingError before anything is written."""
        self.wait()
        staged = stage_fn()
        final = os.path.join(self.folder, step_name(staged["step"]))
        # every rank's staged bytes, the size of a first save (a collective on every save: only
        # rank 0 knows the newest checkpoint's size; the group is idle, no write in flight)
        staged_bytes = sum(gather_objects(_nbytes(staged), self.group))
        needed = self.last_bytes or staged_bytes
        # rank 0 decides for every rank: they write to one filesystem
        nonce, refused = comm.broadcast_object(self._plan(final, needed) if self.mesh.is_main else None, self.group)
        if refused:
            raise TrainingError(refused)
        tmp = f"{final}.tmp-{nonce}"
        self.last_saved_step = staged["step"]
        if blocking:
            self._write(staged, tmp, final)
            return
        self._thread = threading.Thread(target=self._run, args=(staged, tmp, final), name="checkpoint-writer")
        self._thread.start()

    def failed(self) -> bool:
        """Whether the background write has failed (its error is raised by `wait()`)."""
        return self._error is not None

    def wait(self) -> None:
        """Blocks until the write in flight (if any) is complete; re-raises its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, TrainingError):
                raise error
            raise TrainingError(f"writing a checkpoint to {self.folder} failed: {error!r}") from error

    def _plan(self, final: str, needed: int) -> tuple[str, str | None]:
        """(nonce of the temporary folder, why the save cannot start or None). needed: the size of
        the newest checkpoint, or before any the bytes all ranks staged."""
        os.makedirs(self.folder, exist_ok=True)
        free = shutil.disk_usage(self.folder).free
        return uuid.uuid4().hex[:8], _no_space(final, needed, free) if needed and free < needed else None

    def _run(self, staged: dict, tmp: str, final: str) -> None:
        try:
            self._write(staged, tmp, final)
        except BaseException as e:  # polled by the trainer every step, raised by wait()
            self._error = e

    def _write(self, staged: dict, tmp: str, final: str) -> None:
        """Every rank writes its files, then all exchange outcomes and checksums (so a rank that
        failed never leaves the others waiting); rank 0 commits the checkpoint."""
        start = time.perf_counter()
        try:
            files, failure = self._write_files(staged, tmp), None
        except (Exception, CheckpointException) as e:
            files, failure = {}, _describe(e)
        outcomes = gather_objects((files, _nbytes(staged), failure), self.group)
        needed = self.last_bytes or sum(o[1] for o in outcomes)
        failures = [o[2] for o in outcomes if o[2]]
        try:
            if failures:
                raise _Failed(*failures[0])
            if self.mesh.is_main:
                self._commit(tmp, final, {name: e for o in outcomes for name, e in o[0].items()})
        except Exception as e:
            if self.mesh.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            no_space, text = (e.no_space, e.text) if isinstance(e, _Failed) else _describe(e)
            free = shutil.disk_usage(self.folder).free
            if no_space or free < needed:
                raise TrainingError(_no_space(final, needed, free)) from None
            raise TrainingError(f"writing checkpoint {final} failed ({text}); the previous checkpoint "
                                f"({latest_checkpoint(os.path.dirname(self.folder))}) is intact") from e
        if self.mesh.is_main:
            self._clean(os.path.basename(final))
            log.info("saved checkpoint %s", final)
        self.last_write_s = time.perf_counter() - start

    def _write_files(self, staged: dict, tmp: str) -> dict:
        """Writes this rank's files into `tmp` (fsynced); returns their manifest entries."""
        os.makedirs(tmp, exist_ok=True)
        shards, rank = os.path.join(tmp, SHARDS_DIR), staged["rank"]
        # collective over this thread's gloo group: when any rank's write fails, every rank's
        # dcp.save raises (its file writer fsyncs every file it writes)
        dcp.save(staged["shards"], checkpoint_id=shards, process_group=self.group,
                 no_dist=self.group is None)
        # this rank's shard files, hashed from the page cache; rank 0 adds any file none claimed
        files = {f"{SHARDS_DIR}/{n}": file_entry(os.path.join(shards, n)) for n in os.listdir(shards)
                 if n.startswith(f"__{rank}_")}
        buffer = io.BytesIO()
        torch.save(staged["rng"], buffer)
        files[rng_file(rank)] = write_file(os.path.join(tmp, rng_file(rank)), buffer.getvalue())
        if self.mesh.is_main:
            _fsync(shards)
            files[CONFIG_FILE] = write_file(os.path.join(tmp, CONFIG_FILE), staged["config"].encode())
            files[STATE_FILE] = write_file(os.path.join(tmp, STATE_FILE), json.dumps(staged["state"], indent=1).encode())
        return files

    def _commit(self, tmp: str, final: str, files: dict) -> None:
        """Rank 0: the manifest of every rank's files, then the rename and `latest`."""
        self.last_bytes = write_manifest(tmp, files)
        if os.path.exists(final):  # an earlier attempt at this step whose successor crashed
            shutil.rmtree(final)
        _fsync(tmp)
        os.rename(tmp, final)
        _fsync(self.folder)
        write_file(os.path.join(self.folder, LATEST), (os.path.basename(final) + "\n").encode(), atomic=True)
        _fsync(self.folder)

    def _clean(self, newest: str) -> None:
        """Removes temporaries of crashed saves and complete checkpoints beyond `keep` (runs
        after the new checkpoint is complete, when no other save is in flight). Checkpoints go
        by save time, not step: after a resume from an earlier step (another run's checkpoint,
        or an earlier one of this run) the later steps of the abandoned run are the oldest
        saves; `newest`, the one `latest` names, always stays."""
        for name in os.listdir(self.folder):
            if ".tmp-" in name:
                shutil.rmtree(os.path.join(self.folder, name), ignore_errors=True)
            elif name.startswith(LATEST + ".tmp"):  # a pointer update that died before its rename
                os.remove(os.path.join(self.folder, name))
        if self.keep > 0:
            older = sorted((n for n in complete_checkpoints(os.path.dirname(self.folder)) if n != newest),
                           key=lambda n: (_saved_at(os.path.join(self.folder, n)), n))
            for name in older[:max(len(older) - self.keep + 1, 0)]:
                shutil.rmtree(os.path.join(self.folder, name), ignore_errors=True)


class _Failed(Exception):
    """Another rank's (or this rank's) failed write, as exchanged: (no space?, description)."""

    def __init__(self, no_space: bool, text: str):
        super().__init__(text)
        self.no_space, self.text = no_space, text


def _describe(error: BaseException) -> tuple[bool, str]:
    """(whether the disk is full, the innermost error) of a failed write; torch.distributed.
    checkpoint wraps each rank's error in a CheckpointException (`failures`: rank -> (error,
    traceback)), other code chains them."""
    seen, todo = [], [error]
    while todo:
        e = todo.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__]
        todo += [f[0] if isinstance(f, tuple) else f for f in (getattr(e, "failures", None) or {}).values()]
    no_space = any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in seen)
    inner = [e for e in seen if not isinstance(e, CheckpointException)]
    return no_space, repr(inner[-1] if inner else error)


def _no_space(final: str, needed: int | None, free: int) -> str:
    mount = os.path.realpath(os.path.dirname(final))
    while not os.path.ismount(mount):
        mount = os.path.dirname(mount)
    size = f"needs {_size(needed)}, " if needed else ""
    return (f"no space left on {mount} writing {final} ({size}{_size(free)} free); the previous checkpoint "
            f"({latest_checkpoint(os.path.dirname(os.path.dirname(final)))}) is intact: free space on "
            f"{mount}, lower train.keep_checkpoints or move train.run_dir to a larger disk")


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e7 else f"{n / 1e6:.2f} MB"


def _nbytes(obj) -> int:
    """Bytes of the (local shards of the) tensors in a nested structure of dicts and lists."""
    if isinstance(obj, torch.Tensor):
        t = local(obj)
        return t.numel() * t.element_size()
    if isinstance(obj, Mapping):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _saved_at(path: str) -> float:
    """When checkpoint `path` was saved: its state.json's time (the folder's mtime if unreadable)."""
    try:
        return float(read_state(path)["time"])
    except (ValueError, KeyError, TypeError):
        return os.path.getmtime(path)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
