"""Qwen2 (`Qwen2ForCausalLM`) <-> this project's decoder with the "full x N, dense x N" plan.

Our names follow the SpikingBrain-7B release (`embeddings`, `layers.i.attn_norm`, `layers.i.attn.*`,
`layers.i.mlp_norm`, `layers.i.mlp.*`, `norm`, `lm_head`); Qwen2 differs only in a few prefixes.
"""
from __future__ import annotations

import re

from ..config import LayerPlan, ModelConfig

# (ours, Hugging Face Qwen2) name prefixes; {i} is the layer index.
_PREFIXES = [
    ("embeddings.", "model.embed_tokens."),
    ("layers.{i}.attn_norm.", "model.layers.{i}.input_layernorm."),
    ("layers.{i}.mlp_norm.", "model.layers.{i}.post_attention_layernorm."),
    ("layers.{i}.attn.", "model.layers.{i}.self_attn."),
    ("layers.{i}.mlp.", "model.layers.{i}.mlp."),
    ("norm.", "model.norm."),
]


def _rules(to_hf: bool):
    """(regex, replacement) pairs mapping one side's prefixes onto the other's."""
    rules = []
    for ours, hf in _PREFIXES:
        src, dst = (ours, hf) if to_hf else (hf, ours)
        pattern = "^" + re.escape(src).replace(re.escape("{i}"), r"(\d+)")
        rules.append((re.compile(pattern), dst.replace("{i}", r"\1")))
    return rules


def qwen2_config(hf: dict, name: str = "qwen2") -> ModelConfig:
    """A Hugging Face Qwen2 config.json (as a dict) -> ModelConfig with full attention everywhere."""
    if hf.get("model_type") not in (None, "qwen2"):
        raise ValueError(f"expected a qwen2 config, got model_type={hf.get('model_type')!r}")
    if hf.get("use_sliding_window"):
        raise ValueError("Qwen2 configs with use_sliding_window=true are not supported (Qwen2.5 "
                         "checkpoints have it off); convert a model whose attention is full")
    heads = hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or {}
    return ModelConfig(
        name=name,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads", heads),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        intermediate_size=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 1e6))),
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        layer_plan=LayerPlan(mixer=["full"], ffn=["dense"]),
    )


def _rename(state: dict, to_hf: bool) -> dict:
    rules, out = _rules(to_hf), {}
    for key, value in state.items():
        new = key
        for pattern, repl in rules:
            new, n = pattern.subn(repl, key, count=1)
            if n:
                break
        out[new] = value
    return out


def qwen2_to_hf(state: dict) -> dict:
    """Our state dict -> Qwen2ForCausalLM names."""
    return _rename(state, to_hf=True)


def qwen2_from_hf(state: dict, tie_word_embeddings: bool = False) -> dict:
    """Qwen2ForCausalLM state dict -> our names (drops `lm_head` when embeddings are tied and
    rotary buffers that some checkpoints carry)."""
    state = {k: v for k, v in state.items() if "rotary_emb" not in k}
    if tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return _rename(state, to_hf=False)
