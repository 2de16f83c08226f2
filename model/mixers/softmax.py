"""Softmax attention mixers: full causal ("full") and sliding-window ("swa"), RoPE, GQA."""
from torch import nn

from ..layers import RotaryQK
from .projections import add_projections, project_qkv


class SoftmaxAttention(nn.Module):
    """[B, T, hidden] -> [B, T, hidden]. window=None is full causal attention; window=w lets query i
    see keys i-w .. i (w + 1 positions, the convention SpikingBrain-7B was trained with)."""

    def __init__(self, cfg, window: int | None):
        super().__init__()
        self.cfg, self.window = cfg, window
        add_projections(self, cfg)
        self.rotary = RotaryQK()

    def forward(self, x, ctx):
        q, k, v = project_qkv(self, x, self.cfg)
        cos, sin = ctx.rope(self.cfg.head_dim, self.cfg.rope_theta)
        q, k = self.rotary(q, k, cos, sin)
        o = ctx.softmax_attention(q, k, v, window=self.window)
        return self.o_proj(o.flatten(-2))


def full_attention(cfg):
    return SoftmaxAttention(cfg, window=None)


def sliding_window_attention(cfg):
    return SoftmaxAttention(cfg, window=cfg.sliding_window)
