"""Model configuration: dims plus a layer plan (which token mixer and which FFN each layer runs).

A new hybrid is a new YAML file, not new code: the plan is a repeating pattern with per-layer
overrides, resolved here into one mixer name and one FFN name per layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MIXER_NAMES = ("full", "swa", "gla", "gla+swa", "gla+full")
FFN_NAMES = ("dense", "moe")


@dataclass
class GLAConfig:
    """Gated linear attention settings.

    feature_map: applied to q and k ("relu" for SpikingBrain-7B, "sigmoid" for 76B, "identity").
    gate: "lowrank" (log-decay = logsigmoid(W2 W1 x + b) / gate_logit_normalizer, per KV channel)
          or "key" (decay tied to the key: alpha = 1 - k, k = sigmoid(.), no extra parameters).
    """

    feature_map: str = "relu"
    gate: str = "lowrank"
    gate_rank: int = 16
    gate_logit_normalizer: float = 16.0

    def __post_init__(self):
        if self.feature_map not in ("relu", "sigmoid", "identity"):
            raise ValueError(f"model.gla.feature_map must be relu, sigmoid or identity, got {self.feature_map!r}")
        if self.gate not in ("lowrank", "key"):
            raise ValueError(f"model.gla.gate must be 'lowrank' or 'key', got {self.gate!r}")
        if self.gate == "key" and self.feature_map != "sigmoid":
            raise ValueError("model.gla.gate='key' needs model.gla.feature_map='sigmoid' (the decay 1 - k must lie in (0, 1))")
        if self.gate_rank < 1 or self.gate_logit_normalizer <= 0:
            raise ValueError("model.gla.gate_rank and gate_logit_normalizer must be positive")


@dataclass
class MoEConfig:
    """Mixture of experts: `num_experts` routed experts (top-k softmax router) plus shared experts.

    expert_size 0 means the dense FFN size (`intermediate_size`), as upcycling copies the dense FFN.
    balance: over which tokens the balance loss counts expert load: "global" (all micro-batches
    and data-parallel ranks of the optimizer step, so accumulation and dp size leave the gradient
    unchanged) or "micro" (each micro-batch on its own).
    """

    num_experts: int = 16
    top_k: int = 1
    num_shared: int = 1
    expert_size: int = 0
    aux_loss_coef: float = 0.01
    balance: str = "global"

    def __post_init__(self):
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"model.moe.top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.num_shared < 0 or self.expert_size < 0 or self.aux_loss_coef < 0:
            raise ValueError("model.moe.num_shared, expert_size and aux_loss_coef must be >= 0")
        if self.balance not in ("global", "micro"):
            raise ValueError(f"model.moe.balance must be 'global' or 'micro', got {self.balance!r}")


@dataclass
class HybridConfig:
    """Intra-layer parallel hybrid (GLA + softmax branch in one layer).

    shared_qkvo: the two branches share q/k/v/o projections (else each branch has its own).
    num_sinks: learnable sink tokens prepended to the softmax branch's keys/values.
    """

    shared_qkvo: bool = True
    num_sinks: int = 128

    def __post_init__(self):
        if self.num_sinks < 0:
            raise ValueError(f"model.hybrid.num_sinks must be >= 0, got {self.num_sinks}")


SPIKE_TARGETS = ("attn", "mlp", "experts", "router", "head")


@dataclass
class SpikeConfig:
    """Adaptive-threshold spiking of the inputs of linear projections (SpikingBrain's spike coding).

    Each selected projection sees round(x / V_th) * V_th with V_th = mean(|x|) / k per token, and a
    straight-through gradient. targets: "attn" (q/k/v/o and gate projections), "mlp" (dense
    FFNs), "experts" (routed and shared experts, including their down projection's input),
    "router", "head" (the LM head). The router and head stay full precision by default.
    """

    enabled: bool = False
    k: float = 3.0
    targets: list = field(default_factory=lambda: ["attn", "mlp", "experts"])

    def __post_init__(self):
        if not self.k > 0:
            raise ValueError(f"model.spike.k must be > 0, got {self.k}")
        bad = sorted(set(self.targets) - set(SPIKE_TARGETS))
        if bad:
            raise ValueError(f"model.spike.targets: unknown {bad}; choose from {list(SPIKE_TARGETS)}")


@dataclass
class LayerPlan:
    """mixer/ffn: patterns cycled over the layers; mixer_at/ffn_at: overrides by 0-based layer index."""

    mixer: list = field(default_factory=lambda: ["full"])
    ffn: list = field(default_factory=lambda: ["dense"])
    mixer_at: dict = field(default_factory=dict)
    ffn_at: dict = field(default_factory=dict)

    def resolve(self, num_layers: int) -> tuple[list[str], list[str]]:
        return (_resolve(self.mixer, self.mixer_at, num_layers, MIXER_NAMES, "mixer"),
                _resolve(self.ffn, self.ffn_at, num_layers, FFN_NAMES, "ffn"))


def _resolve(pattern, overrides, n, allowed, what):
    if not pattern:
        raise ValueError(f"model.layer_plan.{what} must list at least one entry")
    plan = [pattern[i % len(pattern)] for i in range(n)]
    for idx, name in overrides.items():
        idx = int(idx)
        if not 0 <= idx < n:
            raise ValueError(f"model.layer_plan.{what}_at: layer {idx} is outside 0..{n - 1}")
        plan[idx] = name
    bad = sorted({p for p in plan if p not in allowed})
    if bad:
        raise ValueError(f"model.layer_plan.{what}: unknown {what} {bad}; choose from {list(allowed)}")
    return plan


@dataclass
class ModelConfig:
    """Dims of one decoder plus its layer plan. Head dim defaults to hidden_size / num_heads."""

    name: str = "model"
    vocab_size: int = 152064
    hidden_size: int = 3584
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    head_dim: int = 0
    intermediate_size: int = 18944
    norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_position_embeddings: int = 131072
    sliding_window: int = 4096
    qkv_bias: bool = True
    tie_word_embeddings: bool = False
    init_std: float = 0.02
    layer_plan: LayerPlan = field(default_factory=LayerPlan)
    gla: GLAConfig = field(default_factory=GLAConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    spike: SpikeConfig = field(default_factory=SpikeConfig)

    def __post_init__(self):
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                    "intermediate_size", "sliding_window"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"model.hidden_size={self.hidden_size} is not divisible by "
                                 f"model.num_heads={self.num_heads}; set model.head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_heads={self.num_heads} must be divisible by "
                             f"model.num_kv_heads={self.num_kv_heads} (grouped-query attention)")
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim must be even for rotary embeddings, got {self.head_dim}")
        self.mixers, self.ffns = self.layer_plan.resolve(self.num_layers)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def expert_size(self) -> int:
        return self.moe.expert_size or self.intermediate_size
