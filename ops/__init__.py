"""Ops with a pure-PyTorch reference and fast paths (see each subpackage's dispatcher).

`meta_as_cuda` is shared by the dispatchers that pick by device: inside it, meta tensors take the
CUDA path (its buffers allocated, nothing launched), which is how the memory planner
(parallel/plan_trace.py) replays a CUDA step on the meta device.
"""
import contextlib

import torch

_META_AS_CUDA = False  # set by `meta_as_cuda`


@contextlib.contextmanager
def meta_as_cuda():
    """Meta tensors take the CUDA paths of the ops inside (module docstring)."""
    global _META_AS_CUDA
    before, _META_AS_CUDA = _META_AS_CUDA, True
    try:
        yield
    finally:
        _META_AS_CUDA = before


def takes_cuda_path(t: torch.Tensor) -> bool:
    """Whether t takes the CUDA path: on CUDA, or on meta inside `meta_as_cuda`."""
    return t.is_cuda or (t.device.type == "meta" and _META_AS_CUDA)
