"""Spike-aware models: adaptive-threshold spiking on the inputs of linear projections.

`attach_spiking` adds forward pre-hooks to the selected `nn.Linear` modules and tells the MoE
experts to spike their inputs and their down projection's input, so the same model code trains
with or without spiking; removing the hooks (`detach_spiking`) gives back the exact full-precision
model. Which projection belongs to which target is read from the parameter names.

Each spiked input is a `SpikeSite`; the trainer's firing counters (train/observe.py) give every
site a counter (`SpikeSite.stats`), after which training forwards also count its spikes there.
"""
from __future__ import annotations

import functools
import re

import torch
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


LAYER = re.compile(r"layers\.(\d+)\.")
STATS = ("numel", "zeros", "abs_sum")  # what a SpikeSite counts, in its counter row's order


class SpikeSite:
    """One spiked input: `site(x)` is `spike_quantize(x, k)`.

    layer: the decoder layer the projection is in (None: the LM head); target: its
    `model.spike.targets` group. While `stats` is set (an int64 [3] tensor on the activations'
    device), every forward under autograd (training; not no_grad evaluation or the MoE routing
    pass) also adds the counts' elements, zeros (s = 0) and sum |s| to it, on the device
    without a host sync (the fused Triton kernel computes them in the same pass)."""

    def __init__(self, k: float, layer: int | None, target: str):
        self.k, self.layer, self.target = k, layer, target
        self.stats: torch.Tensor | None = None
        self._spike = functools.partial(spike_quantize, k=k)
        self._spike_counting = functools.partial(spike_quantize, k=k, stats=True)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.stats is None or not torch.is_grad_enabled():
            return self._spike(x)
        r = self._spike_counting(x)
        self.stats.add_(torch.stack([r.stats[n] for n in STATS]))
        return r.out


def _spike_input(site, module, args):
    return (site(args[0]),) + tuple(args[1:])


def _site(name: str, k: float, target: str) -> SpikeSite:
    layer = LAYER.match(name)
    return SpikeSite(k, int(layer.group(1)) if layer else None, target)


def spike_sites(model: nn.Module) -> list[SpikeSite]:
    """The spiked inputs of `model` (or of a pipeline stage of it) that `attach_spiking` made."""
    return [site for module in model.modules() for site in getattr(module, "spike_sites", ())]


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
    handles = []
    for name, module in projections(model, cfg.targets).items():
        target = "experts" if isinstance(module, (Experts, QuantExperts)) else target_of(name)
        module.spike_sites = [_site(name, cfg.k, target)]
        if isinstance(module, (Experts, QuantExperts)):  # the down projection's input
            module.hidden_fn = _site(name, cfg.k, target)
            module.spike_sites.append(module.hidden_fn)
        handles.append(module.register_forward_pre_hook(functools.partial(_spike_input, module.spike_sites[0])))
    return handles


def detach_spiking(model: nn.Module, handles: list) -> None:
    """Removes what `attach_spiking` added: the model computes in full precision again."""
    for handle in handles:
        handle.remove()
    for module in model.modules():
        if isinstance(module, (Experts, QuantExperts)):
            module.hidden_fn = None
        if hasattr(module, "spike_sites"):
            del module.spike_sites
