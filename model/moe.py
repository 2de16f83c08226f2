"""Mixture-of-experts FFN: softmax router, top-k routed experts, always-on shared experts.

Token movement goes through a *dispatcher* (the expert-parallel seam): `LocalDispatcher` keeps
all experts on this device; expert parallelism swaps in an all-to-all dispatcher from
`parallel/` that sends each token to the rank holding its expert. The experts module only sees
rows already grouped by (local) expert.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from ops.moe import grouped_swiglu, permute, unpermute
from .layers import SwiGLU


@dataclass
class DispatchHandle:
    order: torch.Tensor        # [N*k] flat (token, slot) index of each permuted row
    num_tokens: int


class LocalDispatcher:
    """All experts live here: group rows by expert, and scatter results back."""

    def dispatch(self, x, topk_idx, num_experts):
        """x [N, D], topk_idx [N, k] -> rows [N*k, D] grouped by expert, counts [E], handle."""
        x_perm, counts, order = permute(x, topk_idx, num_experts)
        return x_perm, counts, DispatchHandle(order, x.shape[0])

    def combine(self, y_perm, handle: DispatchHandle, topk_weight):
        """y_perm [N*k, D] -> [N, D], weighted sum over each token's k experts."""
        return unpermute(y_perm, handle.order, topk_weight)


class Experts(nn.Module):
    """E SwiGLU experts with stacked weights (nn.Linear layout): gate/up [E, F, D], down [E, D, F]."""

    def __init__(self, num_experts: int, hidden: int, size: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, size, hidden))
        self.up_proj = nn.Parameter(torch.empty(num_experts, size, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, size))
        self.hidden_fn = None  # applied to silu(gate x) * up x before down_proj (spiking sets it)

    @property
    def num_experts(self) -> int:
        """Experts held here (all of them, or this rank's under expert parallelism)."""
        return _local(self.gate_proj).shape[0]

    def forward(self, x_perm, counts):
        """x_perm [M, D] grouped by the experts held here, counts [num_experts]."""
        return grouped_swiglu(x_perm, counts, _local(self.gate_proj), _local(self.up_proj),
                              _local(self.down_proj), hidden_fn=self.hidden_fn)

    def init_weights(self, std: float):
        for p in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(p, std=std)


def _local(w: torch.Tensor) -> torch.Tensor:
    """The experts held here. Expert parallelism (parallel/expert.py) keeps the stacked weights
    as distributed tensors of the full [E, ...] shape, whose `to_local()` is this rank's
    [E/ep, ...]; the model only relies on that method, not on torch.distributed."""
    to_local = getattr(w, "to_local", None)
    return w if to_local is None else to_local()


@dataclass
class RouterStats:
    """What the balance loss needs from one MoE layer's forward pass.

    prob_sum [E] fp32: router probabilities summed over the pass's tokens (carries the gradient);
    counts [E] fp32: routed slots given to each expert (no gradient); tokens: tokens routed.
    """

    prob_sum: torch.Tensor
    counts: torch.Tensor
    tokens: int
    top_k: int
    coef: float

    def balance_loss(self, counts: torch.Tensor | None = None, tokens: int | None = None) -> torch.Tensor:
        """coef * E * sum_e f_e * P_e, with the expert load f_e = counts_e / (tokens * top_k) and
        this pass's share of the mean probability P_e = prob_sum_e / tokens. Default: the pass's own
        counts and tokens ("micro"); the trainer passes those of the whole optimizer step
        ("global"), so summing every pass's loss gives the balance loss of the global batch."""
        counts = self.counts if counts is None else counts
        n = self.tokens if tokens is None else tokens
        return self.coef * counts.numel() * torch.dot(counts / (n * self.top_k), self.prob_sum / n)


class MoE(nn.Module):
    """[B, T, hidden] -> ([B, T, hidden], RouterStats).

    Routed output is weighted by the router probability of each chosen expert (not renormalised),
    so at upcycling a top-1 layer computes shared(x) + p_top1 * expert(x).
    """

    def __init__(self, cfg):
        super().__init__()
        m = cfg.moe
        self.top_k, self.aux_loss_coef = m.top_k, m.aux_loss_coef
        self.num_experts = m.num_experts
        self.router = nn.Linear(cfg.hidden_size, m.num_experts, bias=False)
        self.experts = Experts(m.num_experts, cfg.hidden_size, cfg.expert_size)
        self.shared = SwiGLU(cfg.hidden_size, cfg.expert_size * m.num_shared) if m.num_shared else None
        self.dispatcher = LocalDispatcher()
        self.init_std = cfg.init_std

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = F.softmax(self.router(x).float(), dim=-1)
        topk_w, topk_idx = probs.topk(self.top_k, dim=-1)
        rows, counts, handle = self.dispatcher.dispatch(x, topk_idx, self.num_experts)
        y = self.dispatcher.combine(self.experts(rows, counts), handle, topk_w.to(x.dtype))
        if self.shared is not None:
            y = y + self.shared(x)
        return y.reshape(shape), router_stats(probs, topk_idx, self.aux_loss_coef)

    def init_weights(self):
        self.experts.init_weights(self.init_std)


def router_stats(probs: torch.Tensor, topk_idx: torch.Tensor, coef: float = 1.0) -> RouterStats:
    """probs [N, E] router probabilities, topk_idx [N, k] chosen experts -> RouterStats."""
    num_experts = probs.shape[-1]
    counts = torch.zeros(num_experts, device=probs.device, dtype=torch.float32)
    counts.scatter_add_(0, topk_idx.flatten(), torch.ones(topk_idx.numel(), device=probs.device))
    return RouterStats(probs.float().sum(0), counts, probs.shape[0], topk_idx.shape[-1], coef)


def load_balance_loss(probs: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
    """Switch-style balance loss E * sum_e f_e * P_e of one batch; 1.0 when perfectly balanced.

    probs [N, E] router probabilities, topk_idx [N, k]; f_e = share of routed slots given to e.
    """
    return router_stats(probs, topk_idx).balance_loss()
