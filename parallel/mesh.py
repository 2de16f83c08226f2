"""Process mesh: the world laid out as named axes over `torch.distributed.device_mesh`.

Axes, outermost first: `pp` (pipeline stages), the data-parallel axes `dp_replicate`, `dp_shard`
and `ep`, and `sp` (sequence parallel, innermost so a sequence's ranks share a node). Data
parallelism spans dp_replicate x dp_shard x ep: expert parallelism is carved out of it, so EP
ranks read different data and each holds `num_experts / ep` of the routed experts. ZeRO stage 0
replicates over all dp ranks (dp_replicate = dp, ep = 1), stages 1-3 shard over them.

Flattened axes: `dp` (dp_replicate x dp_shard x ep) is a rank's data coordinate; `shard`
(dp_shard x ep x sp) is the group the ZeRO state of the dense weights is sharded over (SP ranks
hold the same weights, so they shard them too); `expert_shard` (dp_shard x sp) shards the state of
the experts a rank holds, the ranks holding the same experts (expert-data-parallel); `dp_sp` is
every rank of a pipeline stage (losses, counts) and `pp_shard` (pp x shard) every rank holding a
distinct piece of the state (the global gradient norm). A rank's data coordinate, and the groups the
trainer talks over, come from the mesh, never from the global rank.

Nodes: ranks r * n .. (r + 1) * n - 1 share node r (n = `parallel.ranks_per_node`, torchrun's
--nproc-per-node by default; sp, then ep, are the innermost axes, so those groups stay inside a
node while they fit). `levels(axis)` splits a group that spans several nodes, with several of its
ranks on each, into its node-local and cross-node subgroups for the two-level collectives of
`parallel.comm` (expert all-to-all, ZeRO reduce-scatter and gathers); None where the group lies
inside one node, has one rank per node, or `parallel.two_level=false`.

A process started by `torchrun` joins the default process group (NCCL on CUDA, gloo on CPU); a
plain `python` process is a world of one without any process group, and takes the same code path
(every collective in `parallel.comm` is then the identity).
"""
from __future__ import annotations

import datetime
import math
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .comm import Levels
from .config import ParallelConfig

AXES = ("pp", "dp_replicate", "dp_shard", "ep", "sp")
FLAT = {"dp": ("dp_replicate", "dp_shard", "ep"), "shard": ("dp_shard", "ep", "sp"),
        "expert_shard": ("dp_shard", "sp"), "dp_sp": ("dp_replicate", "dp_shard", "ep", "sp"),
        "pp_shard": ("pp", "dp_shard", "ep", "sp")}


class Mesh:
    """rank/world of this process, the device it drives, the degree of each strategy and the
    `DeviceMesh` (None in a world of one) with axes `AXES` (and the flattened `dp`)."""

    def __init__(self, cfg: ParallelConfig, device: str = "auto"):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = pick_device(device, self.local_rank)
        layout, self.zero_stage = world_ranks(cfg, self.world_size)  # checks the degrees
        self.ranks_per_node = node_size(cfg, self.world_size)
        self.nodes = self.world_size // self.ranks_per_node
        self.dp, self.pp, self.ep, self.sp = check_layout(cfg, self.world_size), cfg.pp, cfg.ep, cfg.sp
        self.backend = world_backend(cfg.backend, self.device)
        if self.world_size > 1 and "MASTER_ADDR" not in os.environ and not dist.is_initialized():
            raise ValueError(f"WORLD_SIZE={self.world_size} but no MASTER_ADDR: start multi-rank runs with "
                             f"torchrun (e.g. torchrun --nproc-per-node {self.world_size} launch/pretrain.py ...)")
        # a process group someone else started (the recipe runner, which keeps one for all its
        # stages) outlives this mesh; one started here is torn down by close()
        self._owns_world = init_world(self.backend, self.device)
        self.device_mesh: DeviceMesh | None = None
        self._flat: dict[str, DeviceMesh] = {}  # flattened axes, kept (slicing them from the root is deprecated)
        if dist.is_initialized() and self.world_size > 1:
            self.device_mesh = init_device_mesh(self.device.type, tuple(layout.shape), mesh_dim_names=AXES)
            for name, axes in FLAT.items():
                self._flat[name] = self.device_mesh[axes]._flatten(name)
        self._levels: dict[str, Levels] = {}
        if self.device_mesh is not None and cfg.two_level and self.nodes > 1:
            # every rank builds every subgroup, in the same order (group creation is collective)
            for axis in (("shard",) if self.zero_stage >= 1 else ()) + (("ep", "expert_shard") if self.ep > 1 else ()):
                levels = _split_by_node(self.device_mesh.mesh, axis_dims(axis), self.ranks_per_node)
                if levels is not None:
                    self._levels[axis] = levels

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

    def levels(self, axis: str) -> Levels | None:
        """The node-local and cross-node subgroups of this rank's `axis` group, when it spans
        several nodes with several of its ranks on each (else None: the flat group is used)."""
        return self._levels.get(axis)

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
    def pp_rank(self) -> int:
        return self.coordinate("pp")

    @property
    def pp_group(self):
        return self.group("pp")

    @property
    def ep_rank(self) -> int:
        return self.coordinate("ep")

    @property
    def ep_group(self):
        return self.group("ep")

    @property
    def shard_size(self) -> int:
        """Ranks the ZeRO state is sharded over (stages 1-3) or replicated over (stage 0): dp x sp."""
        return self.dp * self.sp

    def submesh(self, *axes: str) -> DeviceMesh | None:
        """The mesh over `axes` (e.g. `submesh("dp_replicate", "dp_shard")`, or one flattened axis
        such as `submesh("shard")`); None in a world of one."""
        if self.device_mesh is None:
            return None
        if len(axes) == 1 and axes[0] in self._flat:
            return self._flat[axes[0]]
        return self.device_mesh[axes[0] if len(axes) == 1 else axes]

    def fsdp_mesh(self) -> DeviceMesh | None:
        """The mesh the data-parallel engine shards the dense weights over: (dp_replicate,
        dp_shard) for ZeRO stage 0 (replicas, sp = ep = 1), else the flattened dp_shard x ep x sp
        axis (SP and EP ranks shard the dense state they share); None in a world of one."""
        if self.zero_stage == 0:
            return self.submesh("dp_replicate", "dp_shard")
        return self.submesh("shard")

    def expert_mesh(self) -> DeviceMesh | None:
        """The mesh that shards the state of this rank's experts: the ranks holding the same
        experts (dp_shard x sp; ZeRO stages 1-3). None in a world of one."""
        return self.submesh("expert_shard")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if dist.is_initialized():
            # a rank tearing down gloo while a peer still talks to it aborts the peer
            # ("terminate called without an active exception"): leave together
            dist.barrier()
            if self._owns_world:
                dist.destroy_process_group()


def init_world(backend: str, device: torch.device) -> bool:
    """Joins the default process group of a torchrun process (MASTER_ADDR set) unless already
    joined; True when this call started it."""
    if "MASTER_ADDR" not in os.environ or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=int(os.environ.get("RANK", "0")),
                            world_size=int(os.environ.get("WORLD_SIZE", "1")),
                            timeout=datetime.timedelta(minutes=30))
    return True


def world_backend(backend: str, device: torch.device) -> str:
    """`parallel.backend` resolved: auto is NCCL on CUDA, gloo elsewhere."""
    return backend if backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")


def check_layout(cfg: ParallelConfig, world_size: int) -> int:
    """The data-parallel degree of `cfg` on `world_size` ranks; ValueError naming the settings
    when the degrees do not multiply to the world size or ep does not divide dp."""
    rest = cfg.pp * cfg.sp
    dp = cfg.dp or world_size // rest
    if dp * rest != world_size:
        raise ValueError(f"parallel.dp={cfg.dp or 'auto'} x parallel.pp={cfg.pp} x parallel.sp={cfg.sp} does not "
                         f"match the world size {world_size} (torchrun --nproc-per-node x nodes)")
    if dp % cfg.ep:
        raise ValueError(f"parallel.ep={cfg.ep} must divide the data-parallel size {dp} (expert "
                         f"parallelism is carved out of data parallelism: world {world_size} / "
                         f"(pp={cfg.pp} x sp={cfg.sp}))")
    return dp


def node_size(cfg: ParallelConfig, world_size: int) -> int:
    """Ranks per node: `parallel.ranks_per_node`, else torchrun's LOCAL_WORLD_SIZE (its
    --nproc-per-node), else the whole world; ValueError when it does not divide the world."""
    n = cfg.ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if world_size % n:
        raise ValueError(f"parallel.ranks_per_node={n} does not divide the world size {world_size}: every node "
                         f"must hold the same number of ranks")
    return n


def node_blocks(ranks: torch.Tensor, dims: list[int], per_node: int) -> torch.Tensor | None:
    """The groups along mesh `dims` (ranks: the world mesh of global ranks) split by node, as
    [groups, nodes, ranks per node] of global ranks; None unless every group is whole blocks of
    >= 2 ranks on each of >= 2 nodes (then the flat collectives are used)."""
    other = [d for d in range(ranks.dim()) if d not in dims]
    rows = ranks.permute(*other, *dims).reshape(-1, math.prod(ranks.shape[d] for d in dims))  # one group per row
    node = rows // per_node
    size = rows.shape[1]
    on_first = int((node[0] == node[0, 0]).sum())
    if on_first < 2 or on_first == size or size % on_first:
        return None
    grid = node.view(rows.shape[0], size // on_first, on_first)
    if not bool((grid == grid[:, :, :1]).all()) or not bool((grid[:, 1:, 0] > grid[:, :-1, 0]).all()):
        return None
    return rows.view(rows.shape[0], size // on_first, on_first)


def world_ranks(cfg: ParallelConfig, world_size: int) -> tuple[torch.Tensor, int]:
    """(the world's global ranks laid out as the mesh axes `AXES`, the ZeRO stage) of `cfg` on
    `world_size` ranks, as `Mesh` builds it (for the planner: no process group needed)."""
    dp = check_layout(cfg, world_size)
    stage = cfg.stage_for(dp * cfg.sp)
    replicate, shard = (dp, 1) if stage == 0 else (1, dp // cfg.ep)
    return torch.arange(world_size).view(cfg.pp, replicate, shard, cfg.ep, cfg.sp), stage


def axis_dims(axis: str) -> list[int]:
    return [AXES.index(a) for a in FLAT.get(axis, (axis,))]


def _split_by_node(ranks: torch.Tensor, dims: list[int], per_node: int) -> Levels | None:
    """Levels of this rank's group along mesh `dims` (`node_blocks`), its subgroups built."""
    blocks = node_blocks(ranks, dims, per_node)
    if blocks is None:
        return None
    local, _ = dist.new_subgroups_by_enumeration([b.tolist() for g in blocks for b in g])
    rail, _ = dist.new_subgroups_by_enumeration([b.tolist() for g in blocks.transpose(1, 2) for b in g])
    return Levels(local, rail, blocks.shape[1], blocks.shape[2])


def pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={device!r} but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev
