"""The data-parallel engine: ZeRO stages 0-3 on FSDP2 (`torch.distributed.fsdp.fully_shard`).

Why FSDP2 and not DeepSpeed (DESIGN.md allows the PyTorch-native engine where DeepSpeed cannot
meet a requirement; measured with deepspeed 0.19.8, torch 2.13):
- the build order: the model is built on the meta device and sharded before any rank holds
  weights. `deepspeed.initialize` on a meta-built module fails ("Cannot copy out of meta tensor"),
  and its own `zero.Init` materialises every parameter at full size as it is constructed.
- resume across data-parallel size and ZeRO stage: DeepSpeed's checkpoints are tied to the dp
  size and stage they were written with (changing either needs the offline universal-checkpoint
  conversion of the whole state); `torch.distributed.checkpoint` reshards at load time.
- loading: FSDP2 parameters are DTensors whose shard is a row range, so `train.init_from` and
  resume read only a rank's rows.

How the stages map (every parameter is one FSDP2 unit member; the units are the embeddings, each
decoder block and the root holding the final norm and LM head):
- 0: replicated weights, gradients and AdamW state (FSDP2 over a (dp, 1) replicate x shard mesh,
  which is DDP: gradients all-reduced once per step).
- 1: fp32 master weights and AdamW state sharded over dp; gathered weights stay gathered for the
  whole step and gradients accumulate at full size, reduced (reduce-scatter) once per step.
- 2: as 1, but gradients are reduce-scattered after every micro-batch (sharded accumulation).
- 3: as 2, and each unit's gathered weights are freed after its forward and gathered again for
  its backward.
Groups spanning several nodes (`Mesh.levels`): each unit's reduce-scatter and weight gather run
in two levels (`TwoLevelReduceScatter`, `TwoLevelAllGather`: inside the node, then across nodes on
1 / ranks-per-node of the data).
Mixed precision (CUDA, `train.precision` auto/bf16): weights gathered in bf16, gradients reduced
in fp32, master weights and AdamW state fp32. `parallel.offload_optimizer` keeps the sharded
state in host memory and steps AdamW on the CPU (ZeRO-3, CUDA).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed import ReduceOp
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from model.moe import Experts
from . import comm
from .materialize import local


class Engine:
    """The model the trainer calls plus what its data-parallel engine needs per step.

    module: the model to train: the decoder itself (sharded in place when dp x sp > 1), or under
        pipeline parallelism this rank's `parallel.pipeline.Stage`.
    stage: the ZeRO stage in force; sharded: whether FSDP2 manages the weights.
    norm_group: the ranks whose gradients together make the whole model's: the shard group (dp x
        sp; ZeRO stage 0: none) times the pipeline stages. None in a world of one.
    pipeline: the `parallel.pipeline.Pipeline` that runs this rank's stage (pp > 1), else None.
    """

    def __init__(self, module: torch.nn.Module, stage: int, sharded: bool, offload: bool,
                 norm_group=None, device: torch.device | None = None, ep: int = 1, pipeline=None):
        self.module, self.stage, self.sharded, self.offload = module, stage, sharded, offload
        self.norm_group, self.device, self.ep, self.pipeline = norm_group, device, ep, pipeline
        # expert weights under expert parallelism (see _shard_experts: their gradients need / ep)
        self.expert_params = [p for m in module.modules() if _is_experts(m) for p in m.parameters()] if ep > 1 else []

    def micro_batch(self, last: bool) -> None:
        """Before each micro-batch's forward: whether it is the step's last. Stages 0 and 1
        reduce gradients only on the last one; stages 0-2 keep weights gathered until then."""
        if not self.sharded:
            return
        self.module.set_requires_gradient_sync(last or self.stage >= 2)
        self.module.set_reshard_after_backward(last or self.stage == 3)

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float) -> float:
        """Global gradient L2 norm over all ranks' shards (before clipping); scales the gradients
        down to `max_norm` when above it (0 = no clipping), as `clip_grad_norm_` does.

        Sharded or pipelined: each rank sums the squares of its own rows (wherever they live:
        the GPU, or host memory under offload) and the sums are added over `norm_group` on the
        device (with expert parallelism the experts' blocks partition the whole expert tensors
        over the same ranks). Expert gradients are first brought to the dense weights' scale
        (divided by ep)."""
        expert_grads = [local(p.grad) for p in self.expert_params if p.grad is not None]
        if expert_grads:
            torch._foreach_mul_(expert_grads, 1.0 / self.ep)
        params = [p for p in self.module.parameters() if p.grad is not None]
        if not self.sharded and self.pipeline is None:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")))
        grads = [local(p.grad) for p in params]
        squares = torch.zeros((), dtype=torch.float32, device=self.device)
        for t in grads:
            squares += torch.linalg.vector_norm(t, dtype=torch.float32).to(self.device) ** 2
        norm = float(comm.all_reduce(squares, group=self.norm_group).sqrt())
        coef = max_norm / (norm + 1e-6)
        if max_norm > 0 and coef < 1:
            torch._foreach_mul_(grads, coef)
        return norm


class TwoLevelReduceScatter:
    """FSDP2's reduce-scatter (`FSDPModule.set_custom_reduce_scatter`) in two levels over
    `levels` (`parallel.comm.reduce_scatter_two_level`). FSDP2 asks for a sum or a mean."""

    def __init__(self, levels: comm.Levels):
        self.levels = levels

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        _check_group(group, self.levels)
        if op not in (ReduceOp.SUM, ReduceOp.AVG):
            raise ValueError(f"two-level reduce-scatter sums or averages; FSDP2 asked for {op}")
        comm.reduce_scatter_two_level(output_tensor, input_tensor, self.levels, average=op == ReduceOp.AVG)


class TwoLevelAllGather:
    """FSDP2's weight all-gather (`FSDPModule.set_custom_all_gather`) in two levels over
    `levels` (`parallel.comm.all_gather_two_level`)."""

    def __init__(self, levels: comm.Levels):
        self.levels = levels

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        _check_group(group, self.levels)
        comm.all_gather_two_level(output_tensor, input_tensor, self.levels)


def _check_group(group, levels: comm.Levels) -> None:
    if group.size() != levels.size:
        raise RuntimeError(f"two-level collective over {levels.nodes} x {levels.per_node} ranks called on a "
                           f"group of {group.size()}")


def _two_level(unit, levels: comm.Levels | None) -> None:
    if levels is not None:
        unit.set_custom_reduce_scatter(TwoLevelReduceScatter(levels))
        unit.set_custom_all_gather(TwoLevelAllGather(levels))


def shard(model, fsdp_mesh, stage: int, compute_dtype: torch.dtype | None, offload: bool,
          expert_mesh=None, levels: comm.Levels | None = None, expert_levels: comm.Levels | None = None) -> None:
    """Applies FSDP2 to `model` (a Decoder, possibly on the meta device) in place.

    fsdp_mesh: 2-D (dp_replicate, dp_shard) mesh (replicas) or 1-D (the ranks sharding). Units:
    embeddings (unless tied to the head), each block, then the root (final norm, LM head); of a
    pipeline `Stage`, the parts it holds.
    expert_mesh: under expert parallelism (the experts' weights are DTensors over the EP mesh,
    `parallel.expert.shard_experts`), the ranks holding the same experts; each MoE layer's
    experts become their own unit sharded over it, inside the block's unit.
    levels / expert_levels: the two meshes' node split (`Mesh.levels`), when they span nodes."""
    kwargs = {"mesh": fsdp_mesh}
    blocks = model.blocks() if hasattr(model, "blocks") else list(model.layers)  # a pipeline Stage or a Decoder
    if compute_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
    reshard = stage == 3
    # a tied embedding is the head's weight: it stays in the root
    if model.embeddings is not None and not model.cfg.tie_word_embeddings:
        _two_level(fully_shard(model.embeddings, reshard_after_forward=reshard, **kwargs), levels)
    for block in blocks:
        if expert_mesh is not None and _is_experts(getattr(block.mlp, "experts", None)):
            _two_level(_shard_experts(block.mlp.experts, expert_mesh, reshard, kwargs), expert_levels)
        _two_level(fully_shard(block, reshard_after_forward=reshard, **kwargs), levels)
    _two_level(fully_shard(model, reshard_after_forward=reshard, **kwargs), levels)


def _is_experts(m) -> bool:
    """Whether `m` is the stacked routed experts of an MoE layer split over EP ranks."""
    return isinstance(m, Experts) and isinstance(m.gate_proj, DTensor)


def _shard_experts(experts: nn.Module, expert_mesh, reshard: bool, kwargs: dict):
    """One FSDP2 unit for a layer's local experts, sharded over `expert_mesh` (the ranks holding
    them): along the expert dim when every rank gets whole experts, else along dim 1 (the
    projections' rows) so that no rank is left without a share.

    Gradients: FSDP2 averages them over the expert mesh (dp x sp / ep ranks), but an expert's
    weights see the rows routed to them from all ep EP ranks, each scaled like any rank's loss
    (the trainer multiplies by dp x sp / targets so that the dense weights' mean over dp x sp is
    the global-batch gradient): they come out ep times too large, and `Engine` divides them by
    ep after the backward (FSDP2's own divide factor is a PREMUL_SUM reduction gloo lacks)."""
    dim = 0 if experts.num_experts % expert_mesh.size() == 0 else 1
    return fully_shard(experts, reshard_after_forward=reshard, shard_placement_fn=lambda _p: Shard(dim),
                       **{**kwargs, "mesh": expert_mesh})
