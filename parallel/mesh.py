"""Process mesh: the world laid out as named axes over `torch.distributed.device_mesh`.

Axes, outermost first: `pp` (pipeline stages), the data-parallel axes `dp_replicate` and
`dp_shard` (ZeRO stage 0 replicates over all dp ranks, stages 1-3 shard over them; expert
parallelism will be carved out of data parallelism), `sp` (sequence parallel, innermost so a
sequence's ranks share a node). `dp` is the two data-parallel axes flattened into one;
`dp_shard_sp` (dp_shard x sp) is the group the ZeRO state is sharded over (SP ranks hold the same
weights, so they shard them too) and `dp_sp` every rank of a pipeline stage (losses, counts). A rank's
data coordinate, and the groups the trainer talks over, come from the mesh, never from the global
rank.

A process started by `torchrun` joins the default process group (NCCL on CUDA, gloo on CPU); a
plain `python` process is a world of one without any process group, and takes the same code path
(every collective in `parallel.comm` is then the identity).
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .config import ParallelConfig

AXES = ("pp", "dp_replicate", "dp_shard", "sp")
FLAT = {"dp": ("dp_replicate", "dp_shard"), "dp_shard_sp": ("dp_shard", "sp"),
        "dp_sp": ("dp_replicate", "dp_shard", "sp")}
# Strategies whose engines land in later issues; the mesh refuses them instead of running a
# silently different layout.
_PENDING = {"pp": "pipeline parallelism", "ep": "expert parallelism"}


class Mesh:
    """rank/world of this process, the device it drives, the degree of each strategy and the
    `DeviceMesh` (None in a world of one) with axes `AXES` (and the flattened `dp`)."""

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
        self.zero_stage = cfg.stage_for(dp * cfg.sp)
        self.backend = cfg.backend if cfg.backend != "auto" else ("nccl" if self.device.type == "cuda" else "gloo")
        if self.world_size > 1 and "MASTER_ADDR" not in os.environ and not dist.is_initialized():
            raise ValueError(f"WORLD_SIZE={self.world_size} but no MASTER_ADDR: start multi-rank runs with "
                             f"torchrun (e.g. torchrun --nproc-per-node {self.world_size} launch/pretrain.py ...)")
        if "MASTER_ADDR" in os.environ and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(self.backend, rank=self.rank, world_size=self.world_size,
                                    timeout=datetime.timedelta(minutes=30))
        self.device_mesh: DeviceMesh | None = None
        self._flat: dict[str, DeviceMesh] = {}  # flattened axes, kept (slicing them from the root is deprecated)
        if dist.is_initialized() and self.world_size > 1:
            replicate, shard = (dp, 1) if self.zero_stage == 0 else (1, dp)
            self.device_mesh = init_device_mesh(self.device.type, (self.pp, replicate, shard, self.sp),
                                                mesh_dim_names=AXES)
            for name, axes in FLAT.items():
                self._flat[name] = self.device_mesh[axes]._flatten(name)

    def coordinate(self, axis: str) -> int:
        """This rank's index along `axis` (0 in a world of one)."""
        if self.device_mesh is None:
            return 0
        return self._flat[axis].get_local_rank() if axis in self._flat else self.device_mesh.get_local_rank(axis)

    def group(self, axis: str):
        """The process group of `axis` (None in a world of one: collectives are identities)."""
        if self.device_mesh is None:
            return None
        return self._flat[axis].get_group() if axis in self._flat else self.device_mesh.get_group(axis)

    @property
    def world_group(self):
        """Every rank (None in a world of one)."""
        return dist.group.WORLD if self.device_mesh is not None else None

    @property
    def dp_rank(self) -> int:
        return self.coordinate("dp")

    @property
    def dp_group(self):
        return self.group("dp")

    @property
    def sp_rank(self) -> int:
        return self.coordinate("sp")

    @property
    def sp_group(self):
        return self.group("sp")

    @property
    def dp_sp_group(self):
        """Every rank of this pipeline stage: data and sequence parallel (losses, token counts)."""
        return self.group("dp_sp")

    @property
    def shard_size(self) -> int:
        """Ranks the ZeRO state is sharded over (stages 1-3) or replicated over (stage 0): dp x sp."""
        return self.dp * self.sp

    def submesh(self, *axes: str) -> DeviceMesh | None:
        """The mesh over `axes` (e.g. `submesh("dp_replicate", "dp_shard")`, or one flattened axis
        such as `submesh("dp_shard_sp")`); None in a world of one."""
        if self.device_mesh is None:
            return None
        if len(axes) == 1 and axes[0] in self._flat:
            return self._flat[axes[0]]
        return self.device_mesh[axes[0] if len(axes) == 1 else axes]

    def fsdp_mesh(self) -> DeviceMesh | None:
        """The mesh the data-parallel engine shards over: (dp_replicate, dp_shard) for ZeRO stage 0
        (replicas, sp = 1), else the flattened dp_shard x sp axis (SP ranks shard the state they
        share); None in a world of one."""
        if self.zero_stage == 0:
            return self.submesh("dp_replicate", "dp_shard")
        return self.submesh("dp_shard_sp")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

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
