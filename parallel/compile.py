"""Regional `torch.compile` (`train.compile`), applied to the decoder's small elementwise regions.

- `auto` (the default): `regions` when training on CUDA, `none` elsewhere (inductor's CPU code
  needs a C compiler, and the CPU runs are the tiny models where compilation would dominate).
- `none`: eager PyTorch everywhere.
- `regions`: every RMSNorm (block norms, the final norm, the per-head `g_norm`/`s_norm`), every
  dense SwiGLU FFN (its three matmuls stay cuBLAS; SiLU and the product fuse around them) and the
  RoPE of each softmax mixer (`RotaryQK`) are compiled, each with its backward. These are the ops
  the profile of a training step shows as many small fp32 passes over [T, hidden] and [T, FFN]
  tensors. The sequence-mixing cores (Triton GLA and attention, flash/flex attention), the MoE routing (data-
  dependent shapes) and the fused loss stay as they are: they are already single kernels or
  have shapes a compiled graph would re-specialise on every step.

Compiled regions take plain tensors only (never the sequence context), so a new document layout
never recompiles; a region compiles once per distinct shape (the instances of one module class
share the compiled code, the weights are inputs). Parameter names, state dicts and checkpoints
are unchanged, and so is the arithmetic up to the fusion's rounding (fp32 inside a region where
eager rounds to bf16 between ops; tests/parallel/test_compile.py bounds it). Recomputation wraps
the compiled regions, never the other way round.
"""
from __future__ import annotations

import torch
from torch import nn

MODES = ("auto", "none", "regions")


def resolve(mode: str, device: torch.device) -> str:
    """`train.compile` for a run on `device`: auto becomes regions on CUDA, none elsewhere."""
    if mode not in MODES:
        raise ValueError(f"train.compile must be one of {', '.join(MODES)}, got {mode!r}")
    return ("regions" if device.type == "cuda" else "none") if mode == "auto" else mode


def region_types() -> tuple[type, ...]:
    from model.layers import RMSNorm, RotaryQK, SwiGLU

    return RMSNorm, SwiGLU, RotaryQK


def apply_compile(model: nn.Module, mode: str, backend: str = "inductor") -> int:
    """Compiles the regions of `model` in place for `mode` (`train.compile`); returns how many
    modules were marked. Compilation itself happens at their first call (so a meta-device model
    is fine). backend: torch.compile's (tests use "aot_eager", which needs no C compiler)."""
    if mode not in MODES or mode == "auto":
        raise ValueError(f"train.compile must be none or regions here (resolve auto first), got {mode!r}")
    if mode == "none":
        return 0
    kinds = region_types()
    marked = 0
    for module in model.modules():
        if isinstance(module, kinds):
            module.compile(backend=backend)
            marked += 1
    return marked


def compiled_regions(model: nn.Module) -> int:
    """How many modules of `model` run compiled (`nn.Module.compile` was applied)."""
    return sum(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())
