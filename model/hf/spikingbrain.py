"""SpikingBrain Hugging Face layouts <-> ModelConfig and our parameter names, and loading them.

Two layouts, both `model.` + our parameter name (`lm_head.weight` stays top level):
- `gla_swa` (the official SpikingBrain-7B release, `GLAswaForCausalLM`): GLA layers except the
  SWA layers listed in `attn_layers`; dense FFNs; low-rank gate `gk_proj.0/1`; per-head `g_norm`.
  Any ModelConfig whose plan is only `gla`/`swa` mixers, dense FFNs, relu + lowrank GLA fits it.
- `spikingbrain_moe` (our own, for SpikingBrain-76B and anything else): the same naming
  (`model.layers.{i}.attn.{q,k,v,o}_proj`, `.attn.g_norm`, `.attn.s_norm`, `.attn.sinks`
  [S, hidden], `.mlp.router.weight` [E, hidden], `.mlp.experts.{gate_proj,up_proj}` [E, F, hidden],
  `.mlp.experts.down_proj` [E, hidden, F], `.mlp.shared.{gate,up,down}_proj.weight`), and a
  config.json whose `spikingbrain` entry is the full ModelConfig (per-layer `mixers` and `ffns`,
  `gla`, `moe`, `hybrid`), next to the usual top-level HF fields for tools that read those.

`load_hf_checkpoint(path, cfg)` reads either layout (or plain Qwen2), checks dims against `cfg`
and returns our state dict; the trainer's `train.init_from` calls it.
"""
from __future__ import annotations

import dataclasses

import torch

from ..config import GLAConfig, HybridConfig, LayerPlan, ModelConfig, MoEConfig, SpikeConfig
from .checkpoint import HFCheckpoint
from .qwen2 import qwen2_config, qwen2_from_hf

GLA_SWA, SB_MOE = "gla_swa", "spikingbrain_moe"
BOS_EOS = 151643  # Qwen2.5 / SpikingBrain-7B <|endoftext|>

# Settings that decide tensor shapes or the computation; a mismatch against DST is an error.
# (sliding_window and max_position_embeddings may differ: they are run-time choices.)
CHECKED = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
           "intermediate_size", "qkv_bias", "tie_word_embeddings", "norm_eps", "rope_theta",
           "mixers", "ffns")


def to_hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else "model." + name


def from_hf_name(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


def fits_gla_swa(cfg: ModelConfig) -> bool:
    return (set(cfg.mixers) <= {"gla", "swa"} and set(cfg.ffns) == {"dense"}
            and cfg.gla.feature_map == "relu" and cfg.gla.gate == "lowrank" and cfg.qkv_bias)


def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, extra: dict | None = None) -> dict:
    """ModelConfig -> config.json dict, in the gla_swa layout when it fits, else spikingbrain_moe."""
    dtype_name = str(dtype).removeprefix("torch.")
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                  intermediate_size=cfg.intermediate_size, hidden_act="swish",
                  max_position_embeddings=cfg.max_position_embeddings,
                  sliding_window=cfg.sliding_window, norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                  tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=BOS_EOS,
                  eos_token_id=BOS_EOS, torch_dtype=dtype_name)
    if fits_gla_swa(cfg):
        out = dict(architectures=["GLAswaForCausalLM"], model_type=GLA_SWA, **common,
                   attn_mode="chunk", use_short_conv=False, conv_size=4,
                   attn_layers=[i for i, m in enumerate(cfg.mixers) if m == "swa"],
                   gate_low_rank_dim=cfg.gla.gate_rank,
                   gate_logit_normalizer=cfg.gla.gate_logit_normalizer)
    else:
        sb = dataclasses.asdict(cfg)
        sb.pop("layer_plan")
        sb.update(mixers=list(cfg.mixers), ffns=list(cfg.ffns))
        out = dict(architectures=["SpikingBrainMoEForCausalLM"], model_type=SB_MOE, **common,
                   spikingbrain=sb)
    out.update(extra or {})
    return out


def model_config_from_hf(hf: dict, name: str | None = None) -> ModelConfig:
    """config.json dict (gla_swa, spikingbrain_moe or qwen2) -> ModelConfig."""
    kind = hf.get("model_type")
    if kind == "qwen2":
        return qwen2_config(hf, name or "qwen2")
    if kind == GLA_SWA:
        swa = {int(i): "swa" for i in hf.get("attn_layers", [])}
        n = hf["num_hidden_layers"]
        bad = [i for i in swa if not 0 <= i < n]
        if bad:
            raise ValueError(f"config.json: attn_layers {bad} outside 0..{n - 1}")
        return ModelConfig(
            name=name or "sb7b", vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            num_layers=n, num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
            head_dim=hf.get("head_dim") or 0, intermediate_size=hf["intermediate_size"],
            norm_eps=hf.get("norm_eps", 1e-6), rope_theta=float(hf.get("rope_theta", 1e6)),
            max_position_embeddings=hf.get("max_position_embeddings", 131072),
            sliding_window=hf.get("sliding_window", 4096), qkv_bias=True,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            layer_plan=LayerPlan(mixer=["gla"], ffn=["dense"], mixer_at=swa),
            gla=GLAConfig(feature_map="relu", gate="lowrank",
                          gate_rank=hf.get("gate_low_rank_dim", 16),
                          gate_logit_normalizer=float(hf.get("gate_logit_normalizer", 16))))
    if kind == SB_MOE:
        sb = dict(hf["spikingbrain"])
        mixers, ffns = sb.pop("mixers"), sb.pop("ffns")
        plan = LayerPlan(mixer=["full"], ffn=["dense"], mixer_at=dict(enumerate(mixers)),
                         ffn_at=dict(enumerate(ffns)))
        sub = {"gla": GLAConfig, "moe": MoEConfig, "hybrid": HybridConfig, "spike": SpikeConfig}
        kwargs = {k: (sub[k](**v) if k in sub else v) for k, v in sb.items()}
        if name:
            kwargs["name"] = name
        return ModelConfig(layer_plan=plan, **kwargs)
    raise ValueError(f"config.json: unknown model_type {kind!r}; expected qwen2, {GLA_SWA} or {SB_MOE}")


def check_config(expected: ModelConfig, found: ModelConfig, where: str) -> None:
    """Raises ValueError naming the first setting where `found` (from `where`) differs."""
    for key in CHECKED:
        a, b = getattr(expected, key), getattr(found, key)
        if a != b:
            raise ValueError(f"model.{key}={a} but {where} has {key}={b}")
    for sub in ("gla", "moe", "hybrid"):
        used = {"gla": any("gla" in m for m in found.mixers), "moe": "moe" in found.ffns,
                "hybrid": any("+" in m for m in found.mixers)}[sub]
        if not used:
            continue
        a, b = dataclasses.asdict(getattr(expected, sub)), dataclasses.asdict(getattr(found, sub))
        for k in a:
            if sub == "moe" and k in ("aux_loss_coef", "balance"):
                continue  # training choices, not part of the weights
            if a[k] != b[k]:
                raise ValueError(f"model.{sub}.{k}={a[k]} but {where} has {sub}.{k}={b[k]}")


class HFStateReader:
    """A checked, lazy view of DST in our parameter names: `.cfg`, `.names`, `.rows(name, start,
    stop)` -> rows of one tensor cast to `dtype`. Opening checks the config against `cfg` (else
    ValueError naming the setting), that every expected tensor is present and no other, and
    every shape (from the file headers); no tensor data is read until asked for."""

    def __init__(self, path: str, cfg: ModelConfig | None = None, dtype: torch.dtype | None = torch.float32):
        ckpt = HFCheckpoint(path)
        if "quantization_config" in ckpt.config:
            raise ValueError(f"{path}/config.json: a quantized export (quantization_config); its int8 "
                             f"weights cannot initialise or resume training; load it with "
                             f"model.hf.quantized.load_quantized")
        found = model_config_from_hf(ckpt.config)
        if cfg is not None:
            check_config(cfg, found, f"{path}/config.json")
            found = cfg
        if ckpt.config.get("model_type") == "qwen2":  # values are the HF names, keys ours
            source = qwen2_from_hf({n: n for n in ckpt.keys()}, found.tie_word_embeddings)
        else:
            source = {from_hf_name(n): n for n in ckpt.keys()}
        expected = _expected_shapes(found)
        missing = sorted(set(expected) - set(source))
        unexpected = sorted(set(source) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{path}: tensors do not match the model: missing {missing[:8]}"
                             f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                             f"{'...' if len(unexpected) > 8 else ''}")
        for ours, hf_name in source.items():
            shape = ckpt.shape(hf_name)
            if shape != expected[ours]:
                raise ValueError(f"{path}: tensor {hf_name} has shape {shape}, the model expects {expected[ours]}")
        self.cfg, self.names, self.dtype = found, list(source), dtype
        self._ckpt, self._source = ckpt, source

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._cast(self._ckpt.rows(self._source[name], start, stop))

    def get(self, name: str) -> torch.Tensor:
        return self._cast(self._ckpt.get(self._source[name]))

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype) if self.dtype is not None and t.is_floating_point() else t


def load_hf_checkpoint(path: str, cfg: ModelConfig | None = None,
                       dtype: torch.dtype | None = torch.float32) -> tuple[ModelConfig, dict]:
    """DST directory -> (ModelConfig, full state dict in our names, cast to `dtype`); the checks
    of `HFStateReader`. With `cfg` the returned config is `cfg` itself."""
    reader = HFStateReader(path, cfg, dtype)
    return reader.cfg, {name: reader.get(name) for name in reader.names}


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    from ..decoder import build_model
    model = build_model(cfg, device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_into(model, path: str) -> ModelConfig:
    """Loads DST into a built (non-meta) model in place, after checking dims against model.cfg."""
    cfg, state = load_hf_checkpoint(path, model.cfg, dtype=None)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            p.copy_(state[name])
    return cfg
