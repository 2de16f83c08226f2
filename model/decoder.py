"""The one decoder class behind every model: embeddings, a list of blocks built from the layer
plan, final norm, LM head.

Pipeline parallelism cuts `layers` (an ordered list) into stages and calls `embed`, the blocks
and `head` piecewise; nothing here knows about ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from .config import ModelConfig
from .context import SequenceContext
from .layers import RMSNorm, SwiGLU, init_linear
from .mixers import build_mixer
from .moe import MoE, RouterStats

IGNORE_INDEX = -100


@dataclass
class DecoderOutput:
    logits: torch.Tensor | None     # [B, T, V], only when no labels were given
    loss_sum: torch.Tensor | None   # summed token cross-entropy (fp32), when labels were given
    num_tokens: torch.Tensor | None  # labels != IGNORE_INDEX
    aux_loss: torch.Tensor          # MoE balance loss of this pass alone, weighted by model.moe.aux_loss_coef
    router: list[RouterStats]       # per MoE layer, for a balance loss over more than this pass


class Block(nn.Module):
    """x + mixer(attn_norm(x)), then + ffn(mlp_norm(.)). Returns (x, RouterStats or None)."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.mixer_name, self.ffn_name = cfg.mixers[index], cfg.ffns[index]
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = build_mixer(self.mixer_name, cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MoE(cfg) if self.ffn_name == "moe" else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, ctx: SequenceContext):
        x = x + self.attn(self.attn_norm(x), ctx)
        h = self.mlp(self.mlp_norm(x))
        if isinstance(h, tuple):
            h, stats = h
            return x + h, stats
        return x + h, None


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    # -- pieces (for pipeline stages) ------------------------------------------------------
    def embed(self, input_ids, ctx: SequenceContext):
        """input_ids [B, T] -> hidden [B, T, hidden], flattened to [1, B*T, hidden] when packed."""
        if ctx.packed:
            input_ids = input_ids.reshape(1, -1)
        return self.embeddings(input_ids)

    def head(self, h):
        """hidden [..., hidden] -> logits [..., vocab]."""
        h = self.norm(h)
        return self.lm_head(h) if self.lm_head is not None else F.linear(h, self.embeddings.weight)

    # -- full forward ----------------------------------------------------------------------
    def forward(self, input_ids, position_ids=None, labels=None, ctx: SequenceContext | None = None,
                route_only: bool = False):
        """input_ids [B, T]; position_ids [B, T] (restarting at 0 at each packed document; default
        0..T-1); labels [B, T] with IGNORE_INDEX where no loss is taken. route_only: stop after the
        blocks and return only the MoE routing (`router`), e.g. to count expert load first."""
        b, t = input_ids.shape
        if ctx is None:
            if position_ids is None:
                position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
            ctx = SequenceContext.from_position_ids(position_ids)
        h = self.embed(input_ids, ctx)
        router = []
        for block in self.layers:
            h, stats = block(h, ctx)
            if stats is not None:
                router.append(stats)
        aux = sum((s.balance_loss() for s in router), h.new_zeros((), dtype=torch.float32))
        if route_only:
            return DecoderOutput(None, None, None, aux, router)
        logits = self.head(h).reshape(b, t, -1)
        if labels is None:
            return DecoderOutput(logits, None, None, aux, router)
        loss_sum = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
        return DecoderOutput(None, loss_sum, (labels != IGNORE_INDEX).sum(), aux, router)

    # -- weights ---------------------------------------------------------------------------
    def weight_parts(self) -> list[nn.Module]:
        """The units whose weights are initialised together, in a fixed order: the embeddings,
        each block, the final norm and the LM head. Sharded engines materialise one unit at a
        time at full size, so a rank never holds more than one unit's full weights at once."""
        parts = [self.embeddings, *self.layers, self.norm]
        return parts + ([self.lm_head] if self.lm_head is not None else [])

    @torch.no_grad()
    def init_weights(self):
        """Fresh initialisation, unit by unit (`weight_parts`), from the global torch RNG."""
        for part in self.weight_parts():
            init_part(part, self.cfg.init_std)

    def num_params(self) -> dict[str, int]:
        """Total parameters, and those active for one token (top-k of the routed experts)."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for m in self.modules():
            if isinstance(m, MoE):
                per_expert = sum(p.numel() for p in m.experts.parameters()) // m.num_experts
                inactive += (m.num_experts - m.top_k) * per_expert
        return {"total": total, "active": total - inactive}


@torch.no_grad()
def init_part(part: nn.Module, std: float) -> None:
    """Initialises one unit of `Decoder.weight_parts()`: normal(0, std) linears and embeddings,
    unit norms; a block's mixer and MoE layer then apply their own rules (GLA xavier gain 2^-2.5,
    small sinks, experts)."""
    for m in part.modules():
        if isinstance(m, nn.Linear):
            init_linear(m, std=std)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, RMSNorm):
            m.init_weights()
    if isinstance(part, Block):
        for sub in (part.attn, part.mlp):
            if hasattr(sub, "init_weights"):
                sub.init_weights()


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", init: bool = True) -> Decoder:
    """Builds on `device` ("meta" allocates nothing). Parameters stay fp32 (autocast handles bf16).

    The module is always constructed on the meta device and then given storage, so construction
    draws nothing from the RNG: `init` (`init_weights`) alone decides the weights, the same ones
    a sharded build gets. With init=False the weights are uninitialised memory, to be loaded."""
    device = torch.device(device)
    with torch.device("meta"):
        model = Decoder(cfg)
    if device.type != "meta":
        model.to_empty(device=device)
        if init:
            model.init_weights()
    if cfg.spike.enabled:
        from .spiking import attach_spiking

        attach_spiking(model, cfg.spike)
    return model
