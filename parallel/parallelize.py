"""`parallelize()`: the only place parallel strategies are applied to a plain model.

Order: expert parallelism keeps each rank's experts, regional compilation of the small ops,
activation recomputation around the blocks, then the data-parallel engine shards the (meta-built)
model. Pipeline parallelism plugs in at this same function; sequence parallelism lives in the
sequence context the trainer builds per micro-batch.
"""
from __future__ import annotations

import torch

from .compile import apply_compile, resolve
from .engine import Engine, shard
from .expert import shard_all_experts
from .pipeline import Pipeline, Stage, check_pipeline, cut_stages
from .mesh import Mesh
from .recompute import apply_recompute


def compute_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA unless `train.precision=fp32`; None (fp32 throughout) on CPU or fp32."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def parallelize(model: torch.nn.Module, mesh: Mesh, cfg) -> Engine:
    """model: a plain Decoder, normally on the meta device; cfg: RunConfig. Returns the engine
    whose `module` is the model to train (weights still to be materialised and filled): the
    decoder, or under pipeline parallelism this rank's stage of it."""
    offload = cfg.parallel.offload_optimizer
    if offload and mesh.device.type != "cuda":
        raise ValueError("parallel.offload_optimizer=true offloads GPU state to host memory; this run "
                         f"trains on {mesh.device}: set parallel.offload_optimizer=false")
    if offload and mesh.shard_size == 1:
        raise ValueError("parallel.offload_optimizer=true needs the sharded engine (data-parallel size > 1, "
                         "started with torchrun); with one rank set parallel.offload_optimizer=false")
    if mesh.ep > 1:
        shard_all_experts(model, mesh)
    sharded = mesh.shard_size > 1
    dtype = compute_dtype(cfg.train.precision, mesh.device)
    if mesh.pp > 1:  # this rank keeps its stage's part of the model
        local = cfg.train.global_batch // mesh.dp  # train.build has checked the batch divides
        micro = cfg.train.micro_batch or local
        check_pipeline(cfg, mesh.pp, local // micro)
        bounds = cut_stages(cfg.model, cfg.data.seq_len, mesh.pp)
        r = mesh.pp_rank
        model = Stage(model, bounds[r], r == 0, r == mesh.pp - 1,
                      dtype if sharded and dtype is not None else torch.float32)
    apply_compile(model, resolve(cfg.train.compile, mesh.device))
    apply_recompute(model.blocks() if mesh.pp > 1 else model.layers, cfg.train.recompute)
    if sharded:  # SP ranks hold the same weights: they shard them like data-parallel ranks
        shard(model, mesh.fsdp_mesh(), mesh.zero_stage, dtype, offload,
              expert_mesh=mesh.expert_mesh() if mesh.ep > 1 else None,
              levels=mesh.levels("shard"), expert_levels=mesh.levels("expert_shard"))
    pipeline = None
    if mesh.pp > 1:
        pipeline = Pipeline(model, mesh.pp_rank, mesh.pp, mesh.pp_group, mesh.device, local // micro, micro,
                            cfg.data.seq_len // mesh.sp, bounds)
    return Engine(model, mesh.zero_stage, sharded, offload and sharded, norm_group=mesh.group("pp_shard"),
                  device=mesh.device, ep=mesh.ep, pipeline=pipeline)
