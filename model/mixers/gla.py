"""Gated linear attention mixer ("gla").

Two variants, chosen by `model.gla`:
- SpikingBrain-7B: ReLU feature map on q and k, per-channel log-decay from a low-rank projection
  `logsigmoid(W2 W1 x + b) / 16`, shared by the query heads of a KV group.
- SpikingBrain-76B: Sigmoid feature map, decay tied to the key (alpha = 1 - k), no gate params.
No RoPE. A per-head RMSNorm (`g_norm`) normalises the output before o_proj.
"""
import torch
from torch import nn
import torch.nn.functional as F

from ..layers import RMSNorm, init_linear
from .projections import add_projections, project_qkv

GLA_INIT_GAIN = 2 ** -2.5  # xavier gain of fresh GLA layers (as the official GLA code)
FEATURE_MAPS = {"relu": F.relu, "sigmoid": torch.sigmoid, "identity": lambda t: t}


def add_gate(module: nn.Module, cfg) -> None:
    """Registers the low-rank gate `gk_proj` (hidden -> rank -> kv_dim) when the config asks for it."""
    if cfg.gla.gate == "lowrank":
        module.gk_proj = nn.Sequential(nn.Linear(cfg.hidden_size, cfg.gla.gate_rank, bias=False),
                                       nn.Linear(cfg.gla.gate_rank, cfg.kv_dim, bias=True))


def init_gate(module: nn.Module) -> None:
    for lin in getattr(module, "gk_proj", ()):
        init_linear(lin, xavier_gain=GLA_INIT_GAIN)


def gla_core(module: nn.Module, cfg, x, q, k, v, ctx):
    """x [B, T, hidden]; raw projections q [B, T, Hq, D], k/v [B, T, Hkv, D] -> o [B, T, Hq, D].

    Applies the feature map and the gate, then runs the linear-attention core through the context.
    """
    gla = cfg.gla
    if gla.gate == "lowrank":
        g = F.logsigmoid(module.gk_proj(x).float()).view_as(k) / gla.gate_logit_normalizer
    else:  # log(1 - sigmoid(k)), computed without cancellation
        g = F.logsigmoid(-k.float())
    fmap = FEATURE_MAPS[gla.feature_map]
    return ctx.linear_attention(fmap(q), fmap(k), v, g, scale=cfg.head_dim ** -0.5)


class GatedLinearAttention(nn.Module):
    """[B, T, hidden] -> [B, T, hidden]; parameter names follow the official SpikingBrain-7B layout
    (q/k/v/o_proj, gk_proj.0, gk_proj.1, g_norm)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        add_projections(self, cfg)
        add_gate(self, cfg)
        self.g_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x, ctx):
        q, k, v = project_qkv(self, x, self.cfg)
        o = self.g_norm(gla_core(self, self.cfg, x, q, k, v, ctx))
        return self.o_proj(o.flatten(-2))

    def init_weights(self):
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            init_linear(lin, xavier_gain=GLA_INIT_GAIN)
        init_gate(self)
