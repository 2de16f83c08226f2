"""W8ASpike: symmetric INT8 weights with per-group scales, for models that compute with spikes.

Weights `w [..., I]` are cut into groups of `group_size` consecutive input features (the last
group may be shorter). Each group g of each output row gets one scale
    s = clip * max|w_g| / 127,   q = clamp(round(w / s), -127, 127) (int8),   w ~ q * s,
so with clip = 1 every dequantised weight is within half a step (s / 2) of the original. The
clip ratio (<= 1) is what calibration chooses: per group, the ratio from a grid that minimises
the layer's output error on calibration activations, sum_i E[x_i^2] (w_i - q_i s)^2, where x is
the projection's input as the deployed model sees it (spiked). Ratio 1 is always a candidate, so
calibration never does worse than plain max scaling on the calibration data.

`quantize_model` swaps the selected projections for `QuantLinear` and the routed experts for
`QuantExperts` in place. Their state-dict names are the float model's (`weight` is int8, next to
`weight_scale` [O, groups]; experts' `gate_proj`/`up_proj`/`down_proj` int8 next to
`gate_proj_scale` etc.), so a quantised state dict is saved and loaded like any other.
Embeddings, norms, the router and the LM head stay in floating point.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ops.moe import grouped_swiglu
from .moe import Experts

QMAX = 127
QUANT_TARGETS = ("attn", "mlp", "experts")  # projection groups quantised by default
CLIP_RATIOS = tuple(round(1.0 - 0.02 * i, 2) for i in range(11))  # 1.00, 0.98, ..., 0.80


def num_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / group_size)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """w [..., I] -> [..., groups, group_size], zero-padded at the end."""
    pad = num_groups(w.shape[-1], group_size) * group_size - w.shape[-1]
    return F.pad(w, (0, pad)).unflatten(-1, (-1, group_size))


def quantize_groupwise(w: torch.Tensor, group_size: int = 128, clip: torch.Tensor | float = 1.0):
    """w [..., I] float -> (q int8 [..., I], scale float32 [..., groups]).

    clip: ratio (0, 1], a scalar or one per group [..., groups]. A group of zeros gets scale 1.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    wg = _grouped(w.float(), group_size)
    amax = wg.abs().amax(-1)
    scale = torch.where(amax > 0, amax * clip / QMAX, torch.ones_like(amax))
    q = (wg / scale.unsqueeze(-1)).round().clamp(-QMAX, QMAX)
    return q.flatten(-2)[..., :w.shape[-1]].to(torch.int8).contiguous(), scale


def dequantize_groupwise(q: torch.Tensor, scale: torch.Tensor, group_size: int,
                         dtype: torch.dtype = torch.float32):
    """(q int8 [..., I], scale [..., groups]) -> w [..., I] in `dtype`."""
    if scale.shape[-1] != num_groups(q.shape[-1], group_size):
        raise ValueError(f"{scale.shape[-1]} scales per row do not fit {q.shape[-1]} features in "
                         f"groups of {group_size}")
    w = _grouped(q.to(torch.float32), group_size) * scale.unsqueeze(-1)
    return w.flatten(-2)[..., :q.shape[-1]].to(dtype)


def search_clip(w: torch.Tensor, importance: torch.Tensor | None, group_size: int,
                ratios=CLIP_RATIOS) -> torch.Tensor:
    """Per-group clip ratio [..., O, groups] for w [..., O, I] minimising the output error
    sum_i importance_i * (w_i - deq_i)^2 with importance [..., I] = E[x_i^2] (None: uniform).
    Ties keep the larger ratio, so groups whose inputs never fire are not clipped."""
    imp = torch.ones(w.shape[-1], device=w.device) if importance is None else importance.float()
    imp = _grouped(imp, group_size).unsqueeze(-3)  # [..., 1, groups, G]
    best_err = best = None
    for r in sorted(ratios, reverse=True):
        q, s = quantize_groupwise(w, group_size, r)
        err = (_grouped((w.float() - dequantize_groupwise(q, s, group_size)) ** 2, group_size) * imp).sum(-1)
        if best is None:
            best_err, best = err, torch.full_like(err, r)
        else:
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, r, best)
    return best


class QuantLinear(nn.Module):
    """nn.Linear with an int8 weight [O, I] and float32 scales [O, groups]: y = x deq(W)^T + b."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int,
                 device=None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = num_groups(in_features, group_size)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, clip=1.0) -> "QuantLinear":
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, w.device)
        m.weight, m.weight_scale = quantize_groupwise(w, group_size, clip)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach())
        return m

    def forward(self, x):
        return F.linear(x, dequantize_groupwise(self.weight, self.weight_scale, self.group_size, x.dtype),
                        self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, int8 groups of {self.group_size}")


class QuantExperts(nn.Module):
    """`Experts` with int8 stacked weights (gate/up [E, F, D], down [E, D, F]) and per-group
    scales `*_scale` ([E, F, groups(D)], [E, D, groups(F)])."""

    NAMES = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, num_experts: int, hidden: int, size: int, group_size: int, device=None):
        super().__init__()
        self.group_size = group_size
        shapes = {"gate_proj": (size, hidden), "up_proj": (size, hidden), "down_proj": (hidden, size)}
        for name, (o, i) in shapes.items():
            self.register_buffer(name, torch.zeros(num_experts, o, i, dtype=torch.int8, device=device))
            self.register_buffer(f"{name}_scale",
                                 torch.ones(num_experts, o, num_groups(i, group_size), device=device))
        self.hidden_fn = None  # as in Experts: spiking sets it

    @classmethod
    def from_experts(cls, experts: Experts, group_size: int, clips: dict | None = None) -> "QuantExperts":
        e, f, d = experts.gate_proj.shape
        m = cls(e, d, f, group_size, experts.gate_proj.device)
        for name in cls.NAMES:
            q, s = quantize_groupwise(getattr(experts, name).detach(), group_size,
                                      (clips or {}).get(name, 1.0))
            setattr(m, name, q)
            setattr(m, f"{name}_scale", s)
        return m

    @property
    def num_experts(self) -> int:
        return self.gate_proj.shape[0]

    def dequantized(self, name: str, dtype=torch.float32) -> torch.Tensor:
        return dequantize_groupwise(getattr(self, name), getattr(self, f"{name}_scale"),
                                    self.group_size, dtype)

    def forward(self, x_perm, counts):
        gate, up, down = (self.dequantized(n, x_perm.dtype) for n in self.NAMES)
        return grouped_swiglu(x_perm, counts, gate, up, down, hidden_fn=self.hidden_fn)


def quantizable(model: nn.Module, targets=QUANT_TARGETS) -> dict[str, nn.Module]:
    """{name: module} of the float projections (`nn.Linear`) and `Experts` that `targets` select."""
    from .spiking import projections

    return {n: m for n, m in projections(model, targets).items() if isinstance(m, (nn.Linear, Experts))}


@torch.no_grad()
def input_importance(model: nn.Module, batches, targets=QUANT_TARGETS) -> dict[str, torch.Tensor]:
    """E[x_i^2] of the input of every projection `quantizable` selects, over the tokens of
    `batches` (dicts with `input_ids`, `position_ids` [b, L]), as the model computes (with any
    spiking hooks attached, whose output is what the weights see). Runs the model in eval mode.

    Linear: {name: [I]}. Experts: {name + ".gate_proj": [E, D], name + ".down_proj": [E, F]}
    (up_proj shares gate_proj's input), each expert over the tokens routed to it.
    """
    sums: dict[str, torch.Tensor] = {}
    tokens: dict[str, torch.Tensor] = {}

    def add(key, sq, n):  # n: tokens, a scalar or [E, 1] per expert
        sums[key] = sq if key not in sums else sums[key] + sq
        tokens[key] = n if key not in tokens else tokens[key] + n

    def linear_hook(name, module, args):
        x = args[0].detach().float().flatten(0, -2)
        add(name, (x * x).sum(0), torch.tensor(float(x.shape[0]), device=x.device))

    def experts_hook(name, module, args):
        x, sizes = args[0].detach().float(), args[1].tolist()
        e = len(sizes)
        x_sq = torch.zeros(e, module.gate_proj.shape[2], device=x.device)
        h_sq = torch.zeros(e, module.down_proj.shape[2], device=x.device)
        for i, xe in enumerate(torch.split(x, sizes)):
            if xe.shape[0]:
                h = F.silu(F.linear(xe, module.gate_proj[i].float())) * F.linear(xe, module.up_proj[i].float())
                h = h if module.hidden_fn is None else module.hidden_fn(h)
                x_sq[i], h_sq[i] = (xe * xe).sum(0), (h * h).sum(0)
        n = torch.tensor(sizes, dtype=torch.float32, device=x.device).unsqueeze(1)
        add(f"{name}.gate_proj", x_sq, n)
        add(f"{name}.down_proj", h_sq, n)

    handles = []
    for name, module in quantizable(model, targets).items():
        hook = experts_hook if isinstance(module, Experts) else linear_hook
        # registered after any spiking pre-hook, so it sees the spiked input
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name, h=hook: h(n, m, a)))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for batch in batches:
            model(batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {k: v / tokens[k].clamp(min=1) for k, v in sums.items()}


@torch.no_grad()
def quantize_model(model: nn.Module, group_size: int = 128, targets=QUANT_TARGETS,
                   importance: dict[str, torch.Tensor] | None = None, ratios=CLIP_RATIOS) -> dict:
    """Swaps the selected projections for int8 modules in place. With `importance` (from
    `input_importance`) each group's clip ratio is searched; without it scales are max|w|/127.
    Attach spiking (`attach_spiking`) to the result, not before: a module with hooks is refused.
    Returns a summary: quantised module names, int8 parameter count, mean chosen clip ratio."""
    quantized, int8_params, clip_sum, clip_n = [], 0, 0.0, 0
    selected = quantizable(model, targets)
    hooked = [n for n, m in selected.items() if m._forward_pre_hooks or getattr(m, "hidden_fn", None)]
    if hooked:
        raise ValueError(f"quantize_model: {hooked[0]} has spiking (or other hooks) attached; "
                         f"detach it first and attach spiking to the quantised model")
    for name, module in selected.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, Experts):
            clips = {}
            if importance is not None:
                for w in QuantExperts.NAMES:
                    key = f"{name}.{'gate_proj' if w == 'up_proj' else w}"
                    clips[w] = search_clip(getattr(module, w).detach(), importance[key], group_size, ratios)
            new = QuantExperts.from_experts(module, group_size, clips)
            int8_params += sum(getattr(new, w).numel() for w in QuantExperts.NAMES)
            clip_values = list(clips.values())
        else:
            clip = 1.0
            if importance is not None:
                clip = search_clip(module.weight.detach(), importance[name], group_size, ratios)
            new = QuantLinear.from_linear(module, group_size, clip)
            int8_params += new.weight.numel()
            clip_values = [clip] if importance is not None else []
        for c in clip_values:
            clip_sum, clip_n = clip_sum + float(c.sum()), clip_n + c.numel()
        setattr(parent, attr, new)
        quantized.append(name)
    return {"quantized": quantized, "int8_params": int8_params, "group_size": group_size,
            "mean_clip": clip_sum / clip_n if clip_n else 1.0}
