"""Expert parallelism: the all-to-all MoE dispatcher and expert sharding.

The EP group has `ep` ranks; EP rank r owns the global experts [r * E/ep, (r+1) * E/ep) (its
"local" experts 0 .. E/ep - 1). `AllToAllDispatcher` plugs into the MoE layer's dispatcher seam
(model/moe.py): every token copy travels to the rank that owns its expert and its result comes
back, dropless (no capacity, uneven splits), so the layer computes exactly what one device
holding every expert computes. `shard_experts` turns a full MoE layer into this rank's part.

Gradient reduction is not done here: a rank's expert weights see every row routed to them from
the whole EP group, so their gradients are already complete over it (they are reduced over the
expert-data-parallel group only); the router and shared expert see this rank's tokens only and
are reduced over the full data-parallel group, like any dense weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from model.moe import MoE
from ops.moe import permute, unpermute
from parallel.comm import Levels, Route, exchange_counts, group_size, regroup


def check_experts(num_experts: int, ep: int) -> int:
    """The number of experts per EP rank; ValueError naming the settings when E % ep != 0."""
    if num_experts % ep:
        raise ValueError(f"model.moe.num_experts = {num_experts} is not divisible by parallel.ep = {ep}: "
                         f"every expert-parallel rank must own the same number of experts")
    return num_experts // ep


@dataclass
class AllToAllHandle:
    """What combine needs to send each result back and restore token order.

    order [N*k] int64: flat (token, slot) index of each permuted row (as in `permute`);
    route: the all-to-all's sizes (`parallel.comm.Route`: rows to / from each EP rank, and the
    rows relayed when it runs in two levels); blocks[s][j]: rows received from EP rank s for
    local expert j.
    """

    order: torch.Tensor
    num_tokens: int
    route: Route | None
    blocks: list[list[int]]


class AllToAllDispatcher:
    """Dropless token all-to-all over the EP group `group` (None or a group of one: every
    expert is local, and dispatch/combine are exactly LocalDispatcher's). `levels`: the group's
    node split (`Mesh.levels("ep")`) when it spans several nodes; tokens then travel inside the
    node first and cross nodes once per node pair (`parallel.comm.Route`).

    After each dispatch: `last_counts` [E] int64, the routed (token, slot) rows of *this rank's
    tokens* per global expert (summing it over the data-parallel ranks, EP ranks included, gives
    the expert load of the batch without double counting); `last_local_counts` [E/ep] int64,
    the rows each local expert processed (from every EP rank). Both detached, on x's device.
    dispatch and combine (and their backward) are collectives: every EP rank runs each of them,
    also when it sends or receives no rows.
    """

    def __init__(self, group=None, levels: Levels | None = None):
        self.group, self.levels = group, levels
        self.ep = group_size(group)
        self.last_counts: torch.Tensor | None = None
        self.last_local_counts: torch.Tensor | None = None

    def dispatch(self, x, topk_idx, num_experts):
        """x [N, D], topk_idx [N, k] global expert ids -> rows [M, D] for this rank's experts,
        grouped by local expert (rows of every source rank for local expert 0, in source-rank
        order, then local expert 1, ...), counts [E/ep] int64 (rows per local expert, sum M),
        handle.

        Reads the split sizes to the host once (one device-to-host sync per layer): a dropless
        all-to-all cannot size its receive buffers without them (the reference expert GEMM in
        ops.moe reads the local counts once more). Differentiable w.r.t. x."""
        local = check_experts(num_experts, self.ep)
        x_perm, counts, order = permute(x, topk_idx, num_experts)
        self.last_counts = counts.detach()
        if self.ep == 1:
            self.last_local_counts = self.last_counts
            return x_perm, counts, AllToAllHandle(order, x.shape[0], None, [])
        # row s of what arrives: the counts source rank s has for each of our local experts
        recv_counts, via = exchange_counts(counts.view(self.ep, local), self.group, self.levels)  # [ep, E/ep]
        parts = [counts, recv_counts.reshape(-1)] + ([] if via is None else [via.sum(-1).reshape(-1)])
        host = torch.cat(parts).tolist()  # the one host sync
        mine, theirs = host[:num_experts], host[num_experts:num_experts * 2]
        send = [sum(mine[d * local:(d + 1) * local]) for d in range(self.ep)]
        blocks = [theirs[s * local:(s + 1) * local] for s in range(self.ep)]
        relayed = None if via is None else [host[num_experts * 2:][r * self.levels.nodes:(r + 1) * self.levels.nodes]
                                            for r in range(self.levels.per_node)]
        route = Route(send, [sum(row) for row in blocks], self.group, self.levels, relayed)
        # x_perm is sorted by global expert, so rank d's rows are one contiguous piece
        rows = route.there(x_perm)
        local_counts = recv_counts.sum(0)
        self.last_local_counts = local_counts.detach()
        return regroup(rows, blocks), local_counts, AllToAllHandle(order, x.shape[0], route, blocks)

    def combine(self, y_rows, handle: AllToAllHandle, topk_weight):
        """y_rows [M, D] (dispatch's layout) -> [N, D]: results back to their token's rank, then
        each token's k expert outputs summed with topk_weight [N, k]. Differentiable w.r.t.
        y_rows and topk_weight."""
        if self.ep == 1:
            return unpermute(y_rows, handle.order, topk_weight)
        y_perm = handle.route.back(regroup(y_rows, [list(col) for col in zip(*handle.blocks)]))
        return unpermute(y_perm, handle.order, topk_weight)


def shard_experts(moe: MoE, ep: DeviceMesh | dist.ProcessGroup | None = None,
                  levels: Levels | None = None) -> AllToAllDispatcher:
    """Keeps only this EP rank's experts in `moe` and installs the all-to-all dispatcher.

    ep: the 1-D expert-parallel mesh (the training engine: the weights become DTensors of the
    full [E, ...] shape sharded over it, so checkpoints hold whole expert tensors and a run
    resumes on any layout), or a process group (the weights become plain tensors of this rank's
    experts), or None (one rank: nothing to shard).

    The Experts weights gate/up [E, F, D] and down [E, D, F] become new nn.Parameters holding
    rows [r * E/ep, (r+1) * E/ep) (copies, so the full model they came from stays intact; meta
    tensors stay meta). The router and shared expert stay whole. levels: the EP group's node
    split (two-level all-to-all), if any. Returns the dispatcher."""
    mesh = ep if isinstance(ep, DeviceMesh) else None
    group = mesh.get_group() if mesh is not None else ep
    size = group_size(group)
    local = check_experts(moe.num_experts, size)
    if moe.experts.num_experts != moe.num_experts:
        raise ValueError(f"shard_experts: the layer holds {moe.experts.num_experts} of its "
                         f"{moe.num_experts} experts; it is sharded already")
    start = (dist.get_rank(group) if size > 1 else 0) * local
    for name in ("gate_proj", "up_proj", "down_proj"):
        full = getattr(moe.experts, name)
        part = full.detach()[start:start + local].clone()
        if mesh is not None:
            part = DTensor.from_local(part, mesh, [Shard(0)], run_check=False, shape=full.shape,
                                      stride=full.stride())
        setattr(moe.experts, name, nn.Parameter(part, requires_grad=full.requires_grad))
    moe.dispatcher = AllToAllDispatcher(group, levels)
    return moe.dispatcher


def shard_all_experts(model, mesh) -> list[AllToAllDispatcher]:
    """Expert parallelism over `mesh`'s ep axis for every MoE layer of `model` (a Decoder, on
    the meta device before the engine shards it); ValueError naming the settings when the model
    has no MoE layer or its experts do not divide among the EP ranks."""
    layers = [block.mlp for block in model.layers if isinstance(block.mlp, MoE)]
    if not layers:
        raise ValueError(f"parallel.ep={mesh.ep}: model {model.cfg.name} has no MoE layer (model.layer_plan "
                         f"ffn) to split over expert-parallel ranks; set parallel.ep=1")
    check_experts(layers[0].num_experts, mesh.ep)
    ep_mesh = mesh.submesh("ep")
    return [shard_experts(moe, ep_mesh, mesh.levels("ep")) for moe in layers]


def step_volume(cfg, tokens: int, micro_batches: int, element: int) -> int:
    """Bytes one rank sends through the expert all-to-all in an optimizer step of `micro_batches`
    micro-batches of `tokens` tokens each (cfg: RunConfig), routing balanced: per MoE layer the
    forward's dispatch and combine and the backward's two, each sending the (ep - 1) / ep of
    the rank's tokens x top_k rows that belong to other ranks, `element` bytes per value (the
    split counts, E values, are left out)."""
    m, ep = cfg.model, cfg.parallel.ep
    rows = tokens * m.moe.top_k * (ep - 1) // ep
    return 4 * rows * m.hidden_size * element * m.ffns.count("moe") * micro_batches
