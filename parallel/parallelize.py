"""`parallelize()`: the only place parallel strategies are applied to a plain model.

Order: regional compilation of the small ops, activation recomputation around the blocks, then the data-parallel engine shards the
(meta-built) model. Pipeline, expert and sequence parallelism plug in at this same function.
"""
from __future__ import annotations

import torch

from .compile import apply_compile, resolve
from .engine import Engine, shard
from .mesh import Mesh
from .recompute import apply_recompute


def compute_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA unless `train.precision=fp32`; None (fp32 throughout) on CPU or fp32."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def parallelize(model: torch.nn.Module, mesh: Mesh, cfg) -> Engine:
    """model: a plain Decoder, normally on the meta device; cfg: RunConfig. Returns the engine
    whose `module` is the model to train (weights still to be materialised and filled)."""
    offload = cfg.parallel.offload_optimizer
    if offload and mesh.device.type != "cuda":
        raise ValueError("parallel.offload_optimizer=true offloads GPU state to host memory; this run "
                         f"trains on {mesh.device}: set parallel.offload_optimizer=false")
    if offload and mesh.shard_size == 1:
        raise ValueError("parallel.offload_optimizer=true needs the sharded engine (data-parallel size > 1, "
                         "started with torchrun); with one rank set parallel.offload_optimizer=false")
    apply_compile(model, resolve(cfg.train.compile, mesh.device))
    apply_recompute(model.layers, cfg.train.recompute)
    sharded = mesh.shard_size > 1
    if sharded:  # SP ranks hold the same weights: they shard them like data-parallel ranks
        shard(model, mesh.fsdp_mesh(), mesh.zero_stage,
              compute_dtype(cfg.train.precision, mesh.device), offload)
    return Engine(model, mesh.zero_stage, sharded, offload and sharded,
                  shard_group=mesh.group("dp_shard_sp"), device=mesh.device)
