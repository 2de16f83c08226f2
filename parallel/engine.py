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
Mixed precision (CUDA, `train.precision` auto/bf16): weights gathered in bf16, gradients reduced
in fp32, master weights and AdamW state fp32. `parallel.offload_optimizer` keeps the sharded
state in host memory and steps AdamW on the CPU (ZeRO-3, CUDA).
"""
from __future__ import annotations

import torch
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from . import comm


class Engine:
    """The model the trainer calls plus what its data-parallel engine needs per step.

    module: the model to call (the decoder itself, sharded in place when dp > 1).
    stage: the ZeRO stage in force; sharded: whether FSDP2 manages the weights.
    shard_group: the process group over which a parameter's rows are split (None: unsharded).
    """

    def __init__(self, module: torch.nn.Module, stage: int, sharded: bool, offload: bool,
                 shard_group=None, device: torch.device | None = None):
        self.module, self.stage, self.sharded, self.offload = module, stage, sharded, offload
        self.shard_group, self.device = shard_group, device

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

        Sharded: each rank sums the squares of its own rows (wherever they live: the GPU, or host
        memory under offload) and the sums are added over the shard group on the device."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        if not self.sharded:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")))
        local = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params]
        squares = torch.zeros((), dtype=torch.float32, device=self.device)
        for t in local:
            squares += torch.linalg.vector_norm(t, dtype=torch.float32).to(self.device) ** 2
        norm = float(comm.all_reduce(squares, group=self.shard_group).sqrt())
        coef = max_norm / (norm + 1e-6)
        if max_norm > 0 and coef < 1:
            torch._foreach_mul_(local, coef)
        return norm


def shard(model, fsdp_mesh, stage: int, compute_dtype: torch.dtype | None, offload: bool) -> None:
    """Applies FSDP2 to `model` (a Decoder, possibly on the meta device) in place.

    fsdp_mesh: 2-D (dp_replicate, dp_shard) mesh (replicas) or 1-D (the ranks sharding). Units: embeddings (unless tied to the head),
    each block, then the root (final norm, LM head)."""
    kwargs = {"mesh": fsdp_mesh}
    if compute_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
    reshard = stage == 3
    if model.lm_head is not None:  # a tied embedding is the head's weight: it stays in the root
        fully_shard(model.embeddings, reshard_after_forward=reshard, **kwargs)
    for block in model.layers:
        fully_shard(block, reshard_after_forward=reshard, **kwargs)
    fully_shard(model, reshard_after_forward=reshard, **kwargs)
