"""Filling a meta-built (and possibly sharded) model: each rank writes only the rows it owns.

After `parallelize()`, a parameter is either a plain tensor (a world of one) or a DTensor whose
local shard is a range of rows of dim 0 (FSDP2). `materialize` allocates the local shards;
`init_weights` gives every rank exactly the slices of the full model a one-rank init gives;
`load_weights` fills the shards from a reader that returns only the requested rows.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocates (uninitialised) storage for every meta parameter and buffer on `device`."""
    model.to_empty(device=device)


def local_rows(p: torch.Tensor) -> tuple[int, int]:
    """[start, stop) rows of dim 0 of the full tensor that this rank holds for parameter `p`."""
    if not isinstance(p, DTensor):
        return 0, p.shape[0]
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if any(o != 0 for o in offset[1:]) or tuple(shape[1:]) != tuple(p.shape[1:]):
        raise ValueError(f"parameter of shape {tuple(p.shape)} is sharded along a dim other than 0 "
                         f"({p.placements}); only row shards can be filled")
    return offset[0], offset[0] + shape[0]


def local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


def _members(part: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    return [(m, name, p) for m in part.modules() for name, p in m._parameters.items() if p is not None]


@torch.no_grad()
def init_weights(model: nn.Module, init_part: Callable[[nn.Module], None], device: torch.device) -> None:
    """Initialises `model.weight_parts()` one unit at a time: the unit's parameters are swapped
    for full-size tensors on `device`, `init_part(unit)` fills them (from the global RNG, in the
    same order on every rank), and each rank keeps its rows. Peak extra memory: one unit."""
    for part in model.weight_parts():
        members = _members(part)
        if not any(isinstance(p, DTensor) for _, _, p in members):
            init_part(part)
            continue
        for m, name, p in members:
            m._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device),
                                               requires_grad=p.requires_grad)
        try:
            init_part(part)
        finally:
            full = {(id(m), name): m._parameters[name] for m, name, _ in members}
            for m, name, p in members:
                m._parameters[name] = p
        for m, name, p in members:
            start, stop = local_rows(p)
            local(p).copy_(full[(id(m), name)][start:stop])


@torch.no_grad()
def load_weights(model: nn.Module, read_rows: Callable[[str, int, int], torch.Tensor]) -> None:
    """Fills every parameter from `read_rows(name, start, stop)` -> rows [start, stop) of the
    full tensor `name` (our parameter names), asking only for this rank's rows."""
    for name, p in model.named_parameters():
        start, stop = local_rows(p)
        local(p).copy_(read_rows(name, start, stop))
