"""Small building blocks shared by mixers and FFNs."""
import torch
from torch import nn
import torch.nn.functional as F

from ops.norm import rms_norm
from ops.rope import apply_rope


class RMSNorm(nn.Module):
    """RMSNorm over the last dim [..., D] with a learnable scale [D]."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)

    def init_weights(self):
        nn.init.ones_(self.weight)


class SwiGLU(nn.Module):
    """Dense FFN: down(silu(gate(x)) * up(x)), [..., hidden] -> [..., hidden]."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RotaryQK(nn.Module):
    """RoPE on a query and a key tensor: (q [B, T, Hq, D], k [B, T, Hkv, D], cos, sin [B, T, D]) ->
    (q, k) rotated. Holds no weights; a module so that `train.compile=regions` can compile it."""

    def forward(self, q, k, cos, sin):
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def init_linear(module: nn.Linear, std: float | None = None, xavier_gain: float | None = None):
    """normal(0, std) or xavier-uniform(gain) weight; zero bias."""
    if xavier_gain is not None:
        nn.init.xavier_uniform_(module.weight, gain=xavier_gain)
    else:
        nn.init.normal_(module.weight, std=std)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
