"""Training checkpoints: complete-or-ignored directories written in the background, and resume.

Layout (read by `train.export` too)::

    run_dir/checkpoints/step_00000100/
        model.safetensors   full model state dict, our parameter names, fp32 (rank 0)
        optimizer.pt        optimizer state_dict (rank 0; data-parallel replicas are identical)
        rng_rank{r}.pt      each rank's python, numpy, torch CPU (and CUDA) RNG states
        state.json          format, version, step, tokens_seen, skipped_steps, loader, world_size, dp, time
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

import numpy as np
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file

from model.hf.checkpoint import save_safetensors

log = logging.getLogger("train")

FORMAT, VERSION = "spikingbrain-checkpoint", 1
MODEL_FILE, OPTIM_FILE, STATE_FILE, CONFIG_FILE, LATEST = (
    "model.safetensors", "optimizer.pt", "state.json", "config.yaml", "latest")
REQUIRED = (MODEL_FILE, OPTIM_FILE, STATE_FILE, CONFIG_FILE)


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


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


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


def stage(trainer, model: torch.nn.Module) -> dict:
    """Copies of everything a checkpoint holds. model: the plain (unwrapped) model."""
    mesh, cfg = trainer.mesh, trainer.cfg
    staged = {"step": trainer.step, "rank": mesh.rank, "rng": rng_state()}
    if mesh.is_main:
        staged["model"] = {k: v.detach().to("cpu", torch.float32, copy=True).contiguous()
                           for k, v in model.state_dict().items()}
        staged["optimizer"] = _to_cpu(trainer.optimizer.state_dict())
        staged["state"] = {"format": FORMAT, "version": VERSION, "step": trainer.step,
                           "tokens_seen": trainer.tokens_seen, "skipped_steps": trainer.skipped_steps,
                           "loader": trainer.loader.state_dict(), "world_size": mesh.world_size,
                           "dp": mesh.dp, "time": time.time()}
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
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_saved_step: int | None = None

    def save(self, staged: dict, blocking: bool = False) -> None:
        self.wait()
        nonce = [uuid.uuid4().hex[:8] if self.mesh.is_main else None]
        if self.group is not None:
            dist.broadcast_object_list(nonce, src=0, group=self.group)
        tmp = os.path.join(self.folder, f"{step_name(staged['step'])}.tmp-{nonce[0]}")
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
        if self.mesh.is_main:
            save_safetensors(staged["model"], os.path.join(tmp, MODEL_FILE))
            _fsync(os.path.join(tmp, MODEL_FILE))
            _save_torch(staged["optimizer"], os.path.join(tmp, OPTIM_FILE))
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
