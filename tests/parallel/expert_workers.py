"""What the ranks of tests/parallel/test_expert.py run, and the cases both sides share.

A case fixes a MoE layer of sb76b-tiny (seeded weights, top_k, a routing skew forced through the
router weights) and every rank's tokens (seeded by case and rank, a different count per rank).
The test rebuilds all ranks' tokens on one process and runs the full layer with LocalDispatcher;
each rank runs its expert shard with AllToAllDispatcher. Both backpropagate sum(y_r * w_r).
"""
from __future__ import annotations

import copy
import dataclasses

import torch
import torch.distributed as dist

from model.moe import MoE
from parallel.expert import AllToAllDispatcher, shard_experts
from tests.helpers import model_config
from tests.parallel.ranks import error_messages

# skewed: expert 3 never chosen, expert 2 only by rank 0's tokens; one: every token to expert 0
CASES = [dict(name="random-k1", top_k=1, route="random"), dict(name="random-k2", top_k=2, route="random"),
         dict(name="skewed-k1", top_k=1, route="skewed"), dict(name="skewed-k2", top_k=2, route="skewed"),
         dict(name="one-k1", top_k=1, route="one")]
for _i, _case in enumerate(CASES):
    _case["seed"] = 20 + _i


def moe_config(top_k: int = 1, num_experts: int = 4):
    cfg = model_config("sb76b-tiny")
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, top_k=top_k, num_experts=num_experts))


def build(case: dict) -> MoE:
    """The full layer of `case` (every expert, LocalDispatcher), the same on every process."""
    torch.manual_seed(case["seed"])
    moe = MoE(moe_config(case["top_k"]))
    moe.experts.init_weights(0.1)  # outputs of order one, so atol 1e-5 is a real check
    with torch.no_grad():  # the skewed cases' tokens carry +-4 in features 0 and 1
        if case["route"] == "skewed":
            moe.router.weight[3, 0] = -50.0
            moe.router.weight[2, 1] = 50.0
        elif case["route"] == "one":
            moe.router.weight[0, 0] = 50.0
    return moe


def tokens(case: dict, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s input x [2, 5 + rank, D] (a leaf) and loss weight w (same shape)."""
    g = torch.Generator().manual_seed(case["seed"] * 1009 + rank)
    x = torch.randn(2, 5 + rank, 128, generator=g)
    if case["route"] != "random":
        x[..., 0] = 4.0
        x[..., 1] = 4.0 if rank == 0 else -4.0
    return x.requires_grad_(), torch.randn(x.shape, generator=g)


def grads(moe: MoE) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in moe.named_parameters()}


def step(moe: MoE, case: dict, rank: int) -> dict:
    x, w = tokens(case, rank)
    y, _ = moe(x)
    (y * w).sum().backward()
    return {"y": y.detach(), "x_grad": x.grad, "grads": grads(moe)}


def exact_on_one(case: dict, group) -> bool:
    """Sharding over a group of one and the all-to-all dispatcher equal the full layer with
    LocalDispatcher bit for bit (outputs and every gradient)."""
    full = build(case)
    shard = copy.deepcopy(full)
    shard_experts(shard, group)
    a, b = step(full, case, 0), step(shard, case, 0)
    return (torch.equal(a["y"], b["y"]) and torch.equal(a["x_grad"], b["x_grad"])
            and all(torch.equal(a["grads"][n], b["grads"][n]) for n in a["grads"]))


def errors(world: int) -> dict[str, str]:
    """Messages for experts not divisible by ep (raised before any communication)."""
    cfg = moe_config(num_experts=2 * world - 1)
    x, idx = torch.zeros(3, 128), torch.zeros(3, 1, dtype=torch.int64)
    return error_messages([("shard", lambda: shard_experts(MoE(cfg), dist.group.WORLD)),
                           ("dispatch", lambda: AllToAllDispatcher(dist.group.WORLD).dispatch(x, idx, 2 * world - 1))])


def run(_payload=None) -> dict:
    """Every case on the world group (ep = world), plus the group-of-one and error checks."""
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    results = {}
    for case in CASES:
        moe = copy.deepcopy(build(case))
        dispatcher = shard_experts(moe, dist.group.WORLD)
        results[case["name"]] = step(moe, case, rank) | {"counts": dispatcher.last_counts,
                                                          "local_counts": dispatcher.last_local_counts}
    singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    results["one"] = all(exact_on_one(case, singles[rank]) for case in CASES)
    results["errors"] = errors(world)
    return results
