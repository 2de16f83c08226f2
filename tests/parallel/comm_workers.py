"""What the ranks of tests/parallel/test_comm.py run, and the cases both sides share.

A case is a dict (name, op, seed and the op's settings). Every rank builds its inputs from
(case seed, group rank), so the test can rebuild all ranks' inputs on one process and compute the
definition there. Each rank backpropagates sum(out * weight) with a weight from the same seeds.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from parallel import comm
from tests.parallel.ranks import error_messages

S_SHAPE, D_SHAPES = (2, 3, 4, 5), ((2, 3, 4, 1), (2, 3, 4, 5), (5,))


def make(seed: int, rank: int, shape, decay: bool = False) -> torch.Tensor:
    """A leaf fixed by (seed, rank): N(0, 1), or a decay in [0, 1) with about a fifth exact zeros."""
    g = torch.Generator().manual_seed(seed * 1009 + rank)
    if not decay:
        return torch.randn(shape, generator=g).requires_grad_()
    d = torch.rand(shape, generator=g)
    return torch.where(d < 0.2, torch.zeros_like(d), d).requires_grad_()


def weight(case: dict, rank: int, shape) -> torch.Tensor:
    return make(case["seed"] + 500, rank, shape).detach()


def even(n: int, size: int) -> list[int]:
    return [n // size] * size


def cases(size: int) -> list[dict]:
    """Every collective checked on a group of `size` ranks."""
    out = [dict(name="all_gather", op="all_gather"), dict(name="reduce_scatter", op="reduce_scatter"),
           dict(name="all_to_all-even", op="all_to_all", splits=None, give_recv=False)]
    uneven = [[(r + 2 * i) % 3 for i in range(size)] for r in range(size)]  # zero-size pieces
    silent = [[0] * size] + uneven[1:]  # rank 0 sends nothing at all
    for tag, splits in (("uneven", uneven), ("silent", silent)):
        out += [dict(name=f"all_to_all-{tag}-exchanged", op="all_to_all", splits=splits, give_recv=False),
                dict(name=f"all_to_all-{tag}-given", op="all_to_all", splits=splits, give_recv=True)]
    out += [dict(name=f"shift{o:+d}", op="shift", offset=o) for o in ((1, -1) if size == 2 else (1, -1, 2, -2, 3))]
    out += [dict(name=f"linear_prefix-{m}-d{'x'.join(map(str, d))}", op="linear_prefix", method=m, d_shape=d)
            for d in D_SHAPES for m in ("gather", "ring")]
    for i, case in enumerate(out):
        case["seed"] = 10 + i if case["op"] != "linear_prefix" else 100 + D_SHAPES.index(case["d_shape"])
    return out


def inputs(case: dict, rank: int, size: int) -> dict[str, torch.Tensor]:
    """The leaves of this rank (gradients are taken with respect to these)."""
    seed, op = case["seed"], case["op"]
    if op == "all_gather":
        return {"x": make(seed, rank, (3, 2))}
    if op == "reduce_scatter":
        return {"x": make(seed, rank, (2, size, 3))}
    if op == "all_to_all":
        rows = sum(case["splits"][rank]) if case["splits"] else 2 * size
        return {"x": make(seed, rank, (3, rows))}
    if op == "shift":
        return {"x": make(seed, rank, (2, 3))}
    return {"s": make(seed, rank, S_SHAPE), "d": make(seed + 50, rank, case["d_shape"], decay=True)}


def view(case: dict, leaves: dict) -> dict[str, torch.Tensor]:
    """What the op gets: non-contiguous views of the leaves where the op allows it."""
    if case["op"] in ("all_gather", "all_to_all"):
        return {"x": leaves["x"].t()}
    if case["op"] == "reduce_scatter":
        return {"x": leaves["x"].transpose(0, 1)}
    return dict(leaves)


def call(case: dict, t: dict, rank: int, size: int, group) -> torch.Tensor:
    op = case["op"]
    if op == "all_gather":
        return comm.all_gather(t["x"], group=group)
    if op == "reduce_scatter":
        return comm.reduce_scatter(t["x"], group=group)
    if op == "all_to_all":
        splits = case["splits"]
        send = splits[rank] if splits else None
        recv = [splits[i][rank] for i in range(size)] if splits and case["give_recv"] else None
        return comm.all_to_all(t["x"], send_splits=send, recv_splits=recv, group=group)
    if op == "shift":
        return comm.shift(t["x"], offset=case["offset"], group=group)
    return comm.linear_prefix(t["s"], t["d"], method=case["method"], group=group)


def run_case(case: dict, group) -> dict:
    size, rank = comm.group_size(group), dist.get_rank(group)
    leaves = inputs(case, rank, size)
    before = {k: v.detach().clone() for k, v in leaves.items()}
    out = call(case, view(case, leaves), rank, size, group)
    (out * weight(case, rank, out.shape)).sum().backward()
    return {"out": out.detach(), "grads": {k: v.grad for k, v in leaves.items()},
            "intact": all(torch.equal(before[k], v.detach()) for k, v in leaves.items())}


def errors(group) -> dict[str, str]:
    """Messages of the local argument checks on a real group (raised before any communication)."""
    size, x = comm.group_size(group), torch.zeros(4, 2)
    return error_messages([("splits-count", lambda: comm.all_to_all(x, send_splits=[1] * (size + 1), group=group)),
                     ("splits-sum", lambda: comm.all_to_all(x, send_splits=[0] * (size - 1) + [3], group=group)),
                     ("recv-count", lambda: comm.all_to_all(x, recv_splits=[4], group=group)),
                     ("negative", lambda: comm.all_to_all(x, send_splits=[5, -1] + [0] * (size - 2), group=group)),
                     ("offset", lambda: comm.shift(x, offset=0, group=group)),
                     ("reduce_scatter", lambda: comm.reduce_scatter(x[:3], group=group)),
                     ("send-self", lambda: comm.send(x, dist.get_rank(group), group=group))])


def point_to_point(group) -> list[torch.Tensor]:
    """Pairs (0, 1), (2, 3): the even rank sends, then the odd one answers. Returns what arrived."""
    rank = dist.get_rank(group)
    peer, mine = rank ^ 1, make(7, rank, (3, 2)).detach().t()  # non-contiguous on the way out
    if rank % 2 == 0:
        comm.send(mine, peer, group=group)
        return [comm.recv(torch.empty(2, 3), peer, group=group)]
    got = comm.recv(torch.empty(2, 3, dtype=torch.float32), peer, group=group)
    comm.send(mine, peer, group=group)
    return [got]


def run(_payload=None) -> dict:
    """Every case on the world group, on a size-1 group and, at 4 ranks, on the group of global
    ranks [1, 3] (group ranks 0, 1: exercises the group-to-global rank mapping of p2p)."""
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    group = dist.group.WORLD
    results = {c["name"]: run_case(c, group) for c in cases(world)}
    results["errors"] = errors(group)
    results["p2p"] = point_to_point(group)
    singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    x = make(3, rank, (2, 3))
    results["one"] = {"all_gather": comm.all_gather(x, group=singles[rank]).detach(),
                      "shift": comm.shift(x, offset=1, group=singles[rank]),
                      "linear_prefix": comm.linear_prefix(x, x, method="ring", group=singles[rank])}
    sub = dist.new_group([1, 3]) if world == 4 else None
    if sub is not None and rank in (1, 3):
        results["sub"] = {c["name"]: run_case(c, sub) for c in cases(2)}
    return results
