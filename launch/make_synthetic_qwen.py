"""Write a checkpoint with the exact shapes of Qwen2.5-7B (zeros, bf16, sharded safetensors with
an index), to measure conversion time and memory at full size without downloading weights.

    python launch/make_synthetic_qwen.py OUT [--layers 28] [--shard-gb 3.5]
"""
from __future__ import annotations

import argparse
import json
import os

import torch
from safetensors.torch import save_file

HIDDEN, FFN, VOCAB, KV_DIM, HEADS, KV_HEADS = 3584, 18944, 152064, 512, 28, 4


def layer_tensors(i: int) -> dict[str, torch.Tensor]:
    p, z = f"model.layers.{i}.", lambda *shape: torch.zeros(*shape, dtype=torch.bfloat16)
    return {p + "input_layernorm.weight": z(HIDDEN), p + "post_attention_layernorm.weight": z(HIDDEN),
            p + "self_attn.q_proj.weight": z(HIDDEN, HIDDEN), p + "self_attn.q_proj.bias": z(HIDDEN),
            p + "self_attn.k_proj.weight": z(KV_DIM, HIDDEN), p + "self_attn.k_proj.bias": z(KV_DIM),
            p + "self_attn.v_proj.weight": z(KV_DIM, HIDDEN), p + "self_attn.v_proj.bias": z(KV_DIM),
            p + "self_attn.o_proj.weight": z(HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": z(FFN, HIDDEN), p + "mlp.up_proj.weight": z(FFN, HIDDEN),
            p + "mlp.down_proj.weight": z(HIDDEN, FFN)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--shard-gb", type=float, default=3.5)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": HIDDEN,
              "intermediate_size": FFN, "num_hidden_layers": args.layers, "num_attention_heads": HEADS,
              "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "rms_norm_eps": 1e-6,
              "rope_theta": 1e6, "max_position_embeddings": 131072, "tie_word_embeddings": False,
              "use_sliding_window": False, "torch_dtype": "bfloat16", "bos_token_id": 151643,
              "eos_token_id": 151643}
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    zeros = lambda *shape: torch.zeros(*shape, dtype=torch.bfloat16)  # noqa: E731
    groups = ([{"model.embed_tokens.weight": zeros(VOCAB, HIDDEN)}]
              + [layer_tensors(i) for i in range(args.layers)]
              + [{"model.norm.weight": zeros(HIDDEN), "lm_head.weight": zeros(VOCAB, HIDDEN)}])
    shards, current = [], {}
    for group in groups:  # one group at a time in memory beyond the shard being filled
        current.update(group)
        if sum(t.numel() for t in current.values()) * 2 > args.shard_gb * 1e9:
            shards.append(current)
            current = {}
    if current:
        shards.append(current)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(args.out, name), metadata={"format": "pt"})
        for tensor_name, t in shard.items():
            weight_map[tensor_name] = name
            total += t.numel() * 2
    with open(os.path.join(args.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    print(f"wrote {len(shards)} shards, {total / 1e9:.2f} GB to {args.out}")


if __name__ == "__main__":
    main()
