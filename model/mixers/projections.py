"""q/k/v/o projections shared by every mixer (Qwen2 layout: q/k/v with bias, o without)."""
from torch import nn


def add_projections(module: nn.Module, cfg, prefix: str = "") -> None:
    """Registers `{prefix}q_proj`, `k_proj`, `v_proj`, `o_proj` on module."""
    setattr(module, f"{prefix}q_proj", nn.Linear(cfg.hidden_size, cfg.q_dim, bias=cfg.qkv_bias))
    setattr(module, f"{prefix}k_proj", nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=cfg.qkv_bias))
    setattr(module, f"{prefix}v_proj", nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=cfg.qkv_bias))
    setattr(module, f"{prefix}o_proj", nn.Linear(cfg.q_dim, cfg.hidden_size, bias=False))


def project_qkv(module: nn.Module, x, cfg, prefix: str = ""):
    """x [B, T, hidden] -> q [B, T, Hq, D], k and v [B, T, Hkv, D] (before any feature map or RoPE)."""
    b, t, _ = x.shape
    q = getattr(module, f"{prefix}q_proj")(x).view(b, t, cfg.num_heads, cfg.head_dim)
    k = getattr(module, f"{prefix}k_proj")(x).view(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = getattr(module, f"{prefix}v_proj")(x).view(b, t, cfg.num_kv_heads, cfg.head_dim)
    return q, k, v
