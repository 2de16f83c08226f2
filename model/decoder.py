"""The one decoder class behind every model: embeddings, a list of blocks built from the layer
plan, final norm, LM head.

Pipeline parallelism cuts `layers` (an ordered list) into stages and calls `embed`, the blocks
and `head` (or `head_loss`) piecewise; nothing here knows about ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F
import torch.utils._pytree as pytree

from ops.loss import linear_cross_entropy
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


# The output's tensors must be visible to pytree: FSDP2 (the sharded engine) finds a unit's
# outputs that way to hook its pre-backward all-gather. Hidden in an opaque object, torch 2.11
# runs backward ops on freed ZeRO-3 weights (a crash, or silently wrong gradients).
pytree.register_dataclass(DecoderOutput)


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

    def head_loss(self, h, labels):
        """hidden [B, T, hidden] (or [1, B*T, hidden] when packed), labels [B, T] -> summed token
        cross-entropy (fp32 0-dim) over labels != IGNORE_INDEX.

        The logits are made chunk by chunk (`ops.loss.linear_cross_entropy`), never all at once.
        A head that is not a plain bias-free nn.Linear (e.g. `QuantLinear`), or whose hooks need
        more than its input (anything but forward pre-hooks, such as spiking's), takes the full
        logits instead."""
        h, targets = self.norm(h).flatten(0, -2), labels.flatten()
        if self.lm_head is None:
            return linear_cross_entropy(h, self.embeddings.weight, targets, ignore_index=IGNORE_INDEX)
        pre_hooks = _input_hooks(self.lm_head)
        if pre_hooks is None:
            return F.cross_entropy(self.lm_head(h).float(), targets, ignore_index=IGNORE_INDEX,
                                   reduction="sum")
        for hook in pre_hooks:  # as nn.Module.__call__ applies them
            out = hook(self.lm_head, (h,))
            if out is not None:
                h = out[0] if isinstance(out, tuple) else out
        return linear_cross_entropy(h, self.lm_head.weight, targets, ignore_index=IGNORE_INDEX)

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
        if labels is None:
            return DecoderOutput(self.head(h).reshape(b, t, -1), None, None, aux, router)
        return DecoderOutput(None, self.head_loss(h, labels), (labels != IGNORE_INDEX).sum(), aux, router)

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


def _input_hooks(head: nn.Module) -> list | None:
    """The forward pre-hooks of `head` when it is a plain bias-free nn.Linear whose only hooks
    are those (they transform its input), else None: its call cannot be split from its output."""
    g = nn.modules.module
    if type(head) is not nn.Linear or head.bias is not None or head._forward_pre_hooks_with_kwargs:
        return None
    if head._forward_hooks or head._backward_hooks or head._backward_pre_hooks:
        return None
    if (g._global_forward_pre_hooks or g._global_forward_hooks or g._global_backward_hooks
            or g._global_backward_pre_hooks):
        return None
    return list(head._forward_pre_hooks.values())


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
