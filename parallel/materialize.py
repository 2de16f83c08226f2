"""Filling a meta-built (and possibly sharded) model: each rank writes only the rows it owns.

After `parallelize()`, a parameter is either a plain tensor (a world of one) or a DTensor whose
local shard is one block of the full tensor: a range of rows of dim 0 (FSDP2), or under expert
parallelism a range of experts (dim 0) and, where the ranks holding them outnumber them, a range
of dim 1 within those. `materialize` allocates the local shards;
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


def local_block(p: torch.Tensor) -> tuple[slice, ...]:
    """The block of the full tensor (one slice per dim) that this rank holds for parameter `p`."""
    if not isinstance(p, DTensor):
        return tuple(slice(0, n) for n in p.shape)
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


def _members(part: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    return [(m, name, p) for m in part.modules() for name, p in m._parameters.items() if p is not None]


def part_seed(seed: int, index: int) -> int:
    """The RNG seed of weight part `index` of a run seeded with `seed`."""
    return (seed * 1_000_003 + index) % 2**63


@torch.no_grad()
def init_weights(model: nn.Module, init_part: Callable[[nn.Module], None], device: torch.device,
                 seed: int = 0) -> None:
    """Initialises `model.weight_parts()` one unit at a time: the unit's parameters are swapped
    for full-size tensors on `device`, `init_part(unit)` fills them from the global RNG seeded
    with `part_seed(seed, index)`, and each rank keeps its block of them. Peak extra memory: one
    unit. A part is None where another pipeline stage holds it; its own seed keeps every other
    part the same whichever parts a rank holds."""
    for index, part in enumerate(model.weight_parts()):
        if part is None:
            continue
        torch.manual_seed(part_seed(seed, index))
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
            local(p).copy_(full[(id(m), name)][local_block(p)])


@torch.no_grad()
def load_weights(model: nn.Module, read_rows: Callable[[str, int, int], torch.Tensor]) -> None:
    """Fills every parameter from `read_rows(name, start, stop)` -> rows [start, stop) of the
    full tensor `name` (our parameter names), asking only for the rows of this rank's block."""
    for name, p in model.named_parameters():
        rows, *rest = local_block(p)
        local(p).copy_(read_rows(name, rows.start, rows.stop)[(slice(None), *rest)])
