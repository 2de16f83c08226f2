"""Process mesh: the world split into data, pipeline, expert and sequence parallel degrees.

A process started by `torchrun` joins the default process group (NCCL on CUDA, gloo on CPU); a
plain `python` process is a world of one without any process group, and takes the same code path.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from .config import ParallelConfig

# Strategies whose engines land in later issues; the mesh refuses them instead of running a
# silently different layout.
_PENDING = {"pp": "pipeline parallelism", "ep": "expert parallelism", "sp": "sequence parallelism"}


class Mesh:
    """rank/world of this process, the device it drives, and the degree of each strategy."""

    def __init__(self, cfg: ParallelConfig, device: str = "auto"):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = _pick_device(device, self.local_rank)
        for key, what in _PENDING.items():
            if getattr(cfg, key) > 1:
                raise ValueError(f"parallel.{key}={getattr(cfg, key)}: {what} is not available in this "
                                 f"version of the framework; set parallel.{key}=1")
        rest = cfg.pp * cfg.ep * cfg.sp
        dp = cfg.dp or self.world_size // rest
        if dp * rest != self.world_size:
            raise ValueError(f"parallel.dp={cfg.dp or 'auto'} x pp={cfg.pp} x ep={cfg.ep} x sp={cfg.sp} "
                             f"does not match the world size {self.world_size} (torchrun --nproc-per-node x nodes)")
        self.dp, self.pp, self.ep, self.sp = dp, cfg.pp, cfg.ep, cfg.sp
        self.backend = cfg.backend if cfg.backend != "auto" else ("nccl" if self.device.type == "cuda" else "gloo")
        if "MASTER_ADDR" in os.environ and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(self.backend, rank=self.rank, world_size=self.world_size,
                                    timeout=datetime.timedelta(minutes=30))

    @property
    def dp_rank(self) -> int:
        return self.rank  # data parallelism is the only strategy a rank can differ by for now

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            # a rank tearing down gloo while a peer still talks to it aborts the peer
            # ("terminate called without an active exception"): leave together
            dist.barrier()
            dist.destroy_process_group()


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={device!r} but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev
