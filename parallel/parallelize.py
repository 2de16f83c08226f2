"""`parallelize()`: the only place parallel strategies are applied to a plain model.

Data parallelism here is PyTorch DDP (gradient all-reduce, averaged over ranks); the DeepSpeed
ZeRO engine, pipeline, expert and sequence parallelism plug in at this same function.
"""
from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from .mesh import Mesh


def parallelize(model: torch.nn.Module, mesh: Mesh) -> torch.nn.Module:
    """model: single-device module already on mesh.device. Returns the module to train."""
    if mesh.dp > 1:
        ids = [mesh.device.index] if mesh.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside whatever parallelize() wrapped it in."""
    return model.module if isinstance(model, DistributedDataParallel) else model
