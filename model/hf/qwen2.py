"""Qwen2 (`Qwen2ForCausalLM`) <-> this project's decoder with the "full x N, dense x N" plan.

Our names follow the SpikingBrain-7B release (`embeddings`, `layers.i.attn_norm`, `layers.i.attn.*`,
`layers.i.mlp_norm`, `layers.i.mlp.*`, `norm`, `lm_head`); Qwen2 differs only in a few prefixes.
"""
from __future__ import annotations

import re

from ..config import LayerPlan, ModelConfig

# (ours, Hugging Face Qwen2) name fragments, applied in order.
_RENAMES = [
    (r"^embeddings\.", "model.embed_tokens."),
    (r"^layers\.(\d+)\.attn_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^layers\.(\d+)\.mlp_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^layers\.(\d+)\.attn\.", r"model.layers.\1.self_attn."),
    (r"^layers\.(\d+)\.mlp\.", r"model.layers.\1.mlp."),
    (r"^norm\.", "model.norm."),
]
_RENAMES_BACK = [
    (r"^model\.embed_tokens\.", "embeddings."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.attn_norm."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.mlp_norm."),
    (r"^model\.layers\.(\d+)\.self_attn\.", r"layers.\1.attn."),
    (r"^model\.layers\.(\d+)\.mlp\.", r"layers.\1.mlp."),
    (r"^model\.norm\.", "norm."),
]


def qwen2_config(hf: dict, name: str = "qwen2") -> ModelConfig:
    """A Hugging Face Qwen2 config.json (as a dict) -> ModelConfig with full attention everywhere."""
    if hf.get("model_type") not in (None, "qwen2"):
        raise ValueError(f"expected a qwen2 config, got model_type={hf.get('model_type')!r}")
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


def _rename(state: dict, rules) -> dict:
    out = {}
    for key, value in state.items():
        new = key
        for pattern, repl in rules:
            new, n = re.subn(pattern, repl, new)
            if n:
                break
        out[new] = value
    return out


def qwen2_to_hf(state: dict) -> dict:
    """Our state dict -> Qwen2ForCausalLM names."""
    return _rename(state, _RENAMES)


def qwen2_from_hf(state: dict, tie_word_embeddings: bool = False) -> dict:
    """Qwen2ForCausalLM state dict -> our names (drops `lm_head` when embeddings are tied and
    rotary buffers that some checkpoints carry)."""
    state = {k: v for k, v in state.items() if "rotary_emb" not in k}
    if tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return _rename(state, _RENAMES_BACK)
