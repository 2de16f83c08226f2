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
                            dp, zero_stage, time
        config.yaml         the resolved RunConfig
    run_dir/checkpoints/latest   name of the newest complete checkpoint, rewritten last

Every rank writes its files into `step_NNNNNNNN.tmp-<nonce>` (nonce chosen by rank 0 and
broadcast), fsyncs them and meets the others at a barrier; rank 0 then renames the folder,
fsyncs the parent and atomically replaces `latest`. A crash anywhere leaves the previous `latest`
valid; leftover `.tmp-*` folders are never read and are removed by the next save.
"""
from __future__ import annotations

import dataclasses
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
    if mesh.is_main:
        staged["state"] = {"format": FORMAT, "version": VERSION, "step": trainer.step,
                           "tokens_seen": trainer.tokens_seen, "skipped_steps": trainer.skipped_steps,
                           "loader": trainer.loader.state_dict(), "world_size": mesh.world_size,
                           "dp": mesh.dp, "zero_stage": mesh.zero_stage, "time": time.time()}
        staged["config"] = yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
    return staged


# ---------------------------------------------------------------------------------------------
# Writing (background thread).


class Checkpointer:
    """Saves staged state in a background thread; `wait()` joins the write in flight.

    The thread talks to the other ranks over its own gloo group, so its barrier never interleaves
    with the training collectives of the main thread.
    """

    def __init__(self, run_dir: str, mesh, keep: int):
        self.folder, self.mesh, self.keep = checkpoints_dir(run_dir), mesh, keep
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        # on CUDA the staging buffers are pinned and reused by every save (one shard of host memory)
        self.stager = BlockingAsyncStager(cache_staged_state_dict=mesh.device.type == "cuda")
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_saved_step: int | None = None

    def save(self, stage_fn, blocking: bool = False) -> None:
        """stage_fn() -> the staged state (see `stage`); called only once the previous write is
        done, since staging reuses that write's buffers."""
        self.wait()
        staged = stage_fn()
        nonce = comm.broadcast_object(uuid.uuid4().hex[:8] if self.mesh.is_main else None, self.group)
        tmp = os.path.join(self.folder, f"{step_name(staged['step'])}.tmp-{nonce}")
        self.last_saved_step = staged["step"]
        if blocking:
            self._write(staged, tmp)
            return
        self._thread = threading.Thread(target=self._run, args=(staged, tmp), name="checkpoint-writer")
        self._thread.start()

    def wait(self) -> None:
        """Blocks until the write in flight (if any) is complete; re-raises its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"writing a checkpoint to {self.folder} failed: {error!r}") from error

    def _run(self, staged: dict, tmp: str) -> None:
        try:
            self._write(staged, tmp)
        except BaseException as e:  # reported by the next wait() in the main thread
            self._error = e

    def _write(self, staged: dict, tmp: str) -> None:
        os.makedirs(tmp, exist_ok=True)
        _save_torch(staged["rng"], os.path.join(tmp, rng_file(staged["rank"])))
        shards = os.path.join(tmp, SHARDS_DIR)
        # collectives of the save (plan, metadata) go over this thread's own gloo group
        # (its file writer fsyncs every file it writes)
        dcp.save(staged["shards"], checkpoint_id=shards, process_group=self.group,
                 no_dist=self.group is None)
        if self.mesh.is_main:
            _fsync(shards)
            _write_text(os.path.join(tmp, CONFIG_FILE), staged["config"])
            _write_text(os.path.join(tmp, STATE_FILE), json.dumps(staged["state"], indent=1))
        if self.group is not None:
            dist.barrier(group=self.group)  # every rank's files are on disk
        if not self.mesh.is_main:
            return
        final = os.path.join(self.folder, step_name(staged["step"]))
        if os.path.exists(final):  # an earlier attempt at this step whose successor crashed
            shutil.rmtree(final)
        _fsync(tmp)
        os.rename(tmp, final)
        _fsync(self.folder)
        _write_text(os.path.join(self.folder, LATEST), step_name(staged["step"]) + "\n", atomic=True)
        _fsync(self.folder)
        self._clean()
        log.info("saved checkpoint %s", final)

    def _clean(self) -> None:
        """Removes temporaries of crashed saves and complete checkpoints beyond `keep` (runs
        after the new checkpoint is complete, when no other save is in flight)."""
        for name in os.listdir(self.folder):
            if ".tmp-" in name:
                shutil.rmtree(os.path.join(self.folder, name), ignore_errors=True)
            elif name.startswith(LATEST + ".tmp"):  # a pointer update that died before its rename
                os.remove(os.path.join(self.folder, name))
        done = complete_checkpoints(os.path.dirname(self.folder))
        if self.keep > 0:
            for name in done[:-self.keep]:
                shutil.rmtree(os.path.join(self.folder, name), ignore_errors=True)


def _save_torch(obj, path: str) -> None:
    torch.save(obj, path)
    _fsync(path)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: str, text: str, atomic: bool = False) -> None:
    target = f"{path}.tmp{os.getpid()}" if atomic else path
    with open(target, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if atomic:
        os.replace(target, path)
