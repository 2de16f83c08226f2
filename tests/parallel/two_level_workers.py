"""What the ranks of tests/parallel/test_two_level.py run: every two-level collective next to
the flat one on the same inputs, on a world laid over virtual nodes (`parallel.ranks_per_node`).
Each rank returns the largest differences it saw (and the node layouts its mesh found)."""
from __future__ import annotations

import torch

from parallel import comm
from parallel.config import ParallelConfig
from parallel.expert import AllToAllDispatcher
from parallel.mesh import Mesh


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max()) if a.numel() else 0.0


def _splits(src: int, dst: int, size: int, silent: bool) -> int:
    """Rows group rank src sends dst: uneven, with zero-size pieces; rank 0 silent if asked."""
    return 0 if silent and src == 0 else (src * 3 + dst * 5 + 1) % 4


def _leaf(seed: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def _route_case(group, levels, rank: int, silent: bool) -> dict:
    """Route.there / back with levels against the flat all-to-all, values and gradients."""
    size = comm.group_size(group)
    send = [_splits(rank, d, size, silent) for d in range(size)]
    recv = [_splits(s, rank, size, silent) for s in range(size)]
    got_recv, via = comm.exchange_counts(torch.tensor(send).view(size, 1), group, levels)
    route = comm.Route(send, recv, group, levels, via.squeeze(-1).tolist())
    flat = comm.Route(send, recv, group)
    x1, x2 = _leaf(rank, (sum(send), 3)), _leaf(rank, (sum(send), 3))
    w = torch.randn((sum(recv), 3), generator=torch.Generator().manual_seed(100 + rank))
    y1, y2 = flat.there(x1), route.there(x2)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    z1, z2 = _leaf(7 + rank, (sum(recv), 2)), _leaf(7 + rank, (sum(recv), 2))
    v = torch.randn((sum(send), 2), generator=torch.Generator().manual_seed(200 + rank))
    b1, b2 = flat.back(z1), route.back(z2)
    (b1 * v).sum().backward()
    (b2 * v).sum().backward()
    return {"recv": float(got_recv.view(-1).tolist() != recv), "there": _diff(y1, y2), "there_grad": _diff(x1.grad, x2.grad),
            "back": _diff(b1, b2), "back_grad": _diff(z1.grad, z2.grad), "round_trip": _diff(route.back(y2), x2)}


def _reduce_case(group, levels, rank: int) -> dict:
    size = comm.group_size(group)
    x = torch.randn(size * 5, generator=torch.Generator().manual_seed(300 + rank))
    out = {}
    for average in (False, True):
        two = torch.empty(5)
        comm.reduce_scatter_two_level(two, x, levels, average)
        flat = comm._scatter(x.view(size, 5), group) / (size if average else 1)
        out[f"reduce_scatter_{'avg' if average else 'sum'}"] = _diff(two, flat)
    gathered = torch.empty(size * 5)
    comm.all_gather_two_level(gathered, x[:5], levels)
    out["all_gather"] = _diff(gathered, comm._gather(x[:5], group).reshape(-1))
    return out


def _dispatch_case(mesh: Mesh, rank: int) -> dict:
    """The expert dispatcher with and without levels: deliberately unbalanced routing (expert 0
    gets no token, expert 1 all but a few, rank 1 routes everything to the last expert)."""
    group, levels = mesh.ep_group, mesh.levels("ep")
    experts = 2 * mesh.ep
    idx = torch.ones(9, 2, dtype=torch.long)
    idx[:3, 1] = torch.arange(3) % experts + 2
    if rank == 1:
        idx[:] = experts - 1
    results = []
    for lv in (None, levels):
        d = AllToAllDispatcher(group, lv)
        x = _leaf(400 + rank, (9, 4))
        rows, counts, handle = d.dispatch(x, idx, experts)
        scale = torch.cat([torch.full((int(n),), 1.0 + j) for j, n in enumerate(counts.tolist())])
        y = d.combine(rows * scale[:, None], handle, torch.full((9, 2), 0.5))
        y.pow(2).sum().backward()
        results.append((y, x.grad, counts))
    (y1, g1, c1), (y2, g2, c2) = results
    return {"dispatch": _diff(y1, y2), "dispatch_grad": _diff(g1, g2), "local_counts": _diff(c1, c2)}


def run(payload: dict) -> dict:
    mesh = Mesh(ParallelConfig(ep=payload["ep"], zero_stage=1, ranks_per_node=payload["ranks_per_node"]), "cpu")
    layout = {a: (None if mesh.levels(a) is None else (mesh.levels(a).nodes, mesh.levels(a).per_node))
              for a in ("shard", "ep", "expert_shard")}
    out = {"layout": layout, "ranks_per_node": mesh.ranks_per_node, "nodes": mesh.nodes}
    for axis in ("shard", "ep"):
        levels, group = mesh.levels(axis), mesh.group(axis)
        if levels is None:
            continue
        g = comm._rank(group)
        for silent in (False, True):
            out |= {f"{axis}-{'silent-' if silent else ''}{k}": v for k, v in _route_case(group, levels, g, silent).items()}
        out |= {f"{axis}-{k}": v for k, v in _reduce_case(group, levels, g).items()}
    if mesh.levels("ep") is not None:
        out |= _dispatch_case(mesh, mesh.ep_rank)
    return out
