"""Intra-layer parallel hybrid ("gla+swa", "gla+full"), the SpikingBrain-76B token mixer.

The GLA branch and a softmax branch (sliding-window or full attention, with learnable sink
tokens) read the same input; each branch output is RMS-normalised per head, and the two are
summed and projected by o_proj. With `model.hybrid.shared_qkvo` the branches share q/k/v/o
(the GLA branch applies its feature map to the shared q/k, the softmax branch RoPE); otherwise
the GLA branch has its own `gla_{q,k,v,o}_proj`.

Sink tokens (`sinks` [S, hidden]) are per-layer parameters projected by the softmax branch's
k/v projections (no RoPE: they carry no position). Every token attends to all of them. Their own
outputs are never consumed (each layer has fresh sinks), so they are not computed.
"""
import torch
from torch import nn

from ..layers import RMSNorm, RotaryQK, init_linear
from .gla import GLA_INIT_GAIN, add_gate, gla_core, init_gate
from .projections import add_projections, project_qkv


class ParallelHybrid(nn.Module):
    """[B, T, hidden] -> [B, T, hidden]."""

    def __init__(self, cfg, window: int | None):
        super().__init__()
        self.cfg, self.window = cfg, window
        self.shared = cfg.hybrid.shared_qkvo
        add_projections(self, cfg)
        if not self.shared:
            add_projections(self, cfg, prefix="gla_")
        add_gate(self, cfg)
        self.g_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.s_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.rotary = RotaryQK()
        n = cfg.hybrid.num_sinks
        self.sinks = nn.Parameter(torch.empty(n, cfg.hidden_size)) if n else None

    def forward(self, x, ctx):
        cfg = self.cfg
        q, k, v = project_qkv(self, x, cfg)
        gq, gk, gv = (q, k, v) if self.shared else project_qkv(self, x, cfg, prefix="gla_")
        o_lin = self.g_norm(gla_core(self, cfg, x, gq, gk, gv, ctx))

        cos, sin = ctx.rope(cfg.head_dim, cfg.rope_theta)
        sink_k = sink_v = None
        if self.sinks is not None:
            s = self.sinks.to(x.dtype)
            sink_k = self.k_proj(s).view(-1, cfg.num_kv_heads, cfg.head_dim)
            sink_v = self.v_proj(s).view(-1, cfg.num_kv_heads, cfg.head_dim)
        rq, rk = self.rotary(q, k, cos, sin)
        o_soft = ctx.softmax_attention(rq, rk, v, window=self.window, sink_k=sink_k, sink_v=sink_v)
        o_soft = self.s_norm(o_soft)
        if self.shared:
            return self.o_proj((o_lin + o_soft).flatten(-2))
        return self.o_proj(o_soft.flatten(-2)) + self.gla_o_proj(o_lin.flatten(-2))

    def init_weights(self):
        if not self.shared:
            for name in ("q", "k", "v", "o"):
                init_linear(getattr(self, f"gla_{name}_proj"), xavier_gain=GLA_INIT_GAIN)
        init_gate(self)
        if self.sinks is not None:
            nn.init.normal_(self.sinks, std=self.cfg.init_std)


def hybrid_swa(cfg):
    return ParallelHybrid(cfg, window=cfg.sliding_window)


def hybrid_full(cfg):
    return ParallelHybrid(cfg, window=None)
