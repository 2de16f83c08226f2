"""Collectives the framework makes, each on the group it belongs to.

`group=None` means "no group": a world of one (plain `python`), where every collective is the
identity, so single-process runs take the same code path as torchrun ones. Results are new
tensors; inputs are never modified.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def group_size(group) -> int:
    return dist.get_world_size(group) if group is not None else 1


def all_reduce(x: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """x reduced over `group` (op: sum, max or min); the identity without a group."""
    if group is None or group_size(group) == 1:
        return x
    out = x.detach().clone()
    dist.all_reduce(out, op=_OPS[op], group=group)
    return out


def any_rank(flag: bool, device: torch.device, group=None) -> bool:
    """True on every rank of `group` when `flag` is true on any of them."""
    return bool(all_reduce(torch.tensor([float(flag)], device=device), "max", group).item())


def broadcast_object(obj, group=None, src_rank: int = 0):
    """`obj` of the group's rank `src_rank` (a group-local index), on every rank of `group`."""
    if group is None or group_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, group_src=src_rank, group=group)
    return box[0]
