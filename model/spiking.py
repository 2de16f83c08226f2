"""Spike-aware models: adaptive-threshold spiking on the inputs of linear projections.

`attach_spiking` adds forward pre-hooks to the selected `nn.Linear` modules and tells the MoE
experts to spike their inputs and their down projection's input, so the same model code trains
with or without spiking; removing the hooks (`detach_spiking`) gives back the exact full-precision
model. Which projection belongs to which target is read from the parameter names.
"""
from __future__ import annotations

import functools

from torch import nn

from ops.spike import spike_quantize
from .moe import Experts
from .quant import QuantExperts, QuantLinear


def target_of(name: str) -> str | None:
    """The `model.spike.targets` group of the linear layer called `name` (None: never spiked)."""
    if name == "lm_head":
        return "head"
    if ".attn." in name:
        return "attn"
    if ".mlp.router" in name:
        return "router"
    if ".mlp.shared." in name:
        return "experts"
    if ".mlp." in name:
        return "mlp"
    return None


def _spike_input(k, module, args):
    return (spike_quantize(args[0], k),) + tuple(args[1:])


def projections(model: nn.Module, targets) -> dict[str, nn.Module]:
    """{name: module} of the linear projections (`nn.Linear`, `QuantLinear`) and routed experts
    (`Experts`, `QuantExperts`) in the target groups `targets`: what spiking (and W8ASpike
    quantisation) applies to."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, QuantLinear)) and target_of(name) in targets:
            out[name] = module
        elif isinstance(module, (Experts, QuantExperts)) and "experts" in targets:
            out[name] = module
    return out


def attach_spiking(model: nn.Module, cfg) -> list:
    """Spikes the inputs of the projections `cfg.targets` selects (cfg: SpikeConfig). Returns the
    hook handles; safe to call once per model."""
    hook = functools.partial(_spike_input, cfg.k)
    handles = []
    for module in projections(model, cfg.targets).values():
        if isinstance(module, (Experts, QuantExperts)):
            module.hidden_fn = functools.partial(spike_quantize, k=cfg.k)
        handles.append(module.register_forward_pre_hook(hook))
    return handles


def detach_spiking(model: nn.Module, handles: list) -> None:
    """Removes what `attach_spiking` added: the model computes in full precision again."""
    for handle in handles:
        handle.remove()
    for module in model.modules():
        if isinstance(module, (Experts, QuantExperts)):
            module.hidden_fn = None
