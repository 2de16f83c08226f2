"""Write a synthetic Qwen2 checkpoint (bf16, sharded safetensors with an index, no tokenizer):
the exact shapes of Qwen2.5-7B in zeros, to measure conversion time and memory at full size
without downloading weights, or (--tiny) the dims of conf/model/qwen2.5-7b-tiny.yaml with random
weights, to try conversion end to end in seconds.

    python launch/make_synthetic_qwen.py OUT [--tiny [--seed 0]] [--layers N] [--shard-gb 3.5]

    python launch/make_synthetic_qwen.py /tmp/qwen-tiny --tiny
    python launch/convert.py /tmp/qwen-tiny /tmp/sb7b-tiny-init --target sb7b-tiny
    python launch/pretrain.py +model=sb7b-tiny train.init_from=/tmp/sb7b-tiny-init
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import yaml
from safetensors.torch import save_file

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
FULL = {"hidden_size": 3584, "intermediate_size": 18944, "vocab_size": 152064, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 131072,
        "rope_theta": 1e6, "rms_norm_eps": 1e-6}
INIT_STD = 0.02  # of the random (--tiny) weights, as Hugging Face initialises Qwen2


def tiny_dims() -> dict:
    """The Hugging Face config fields of conf/model/qwen2.5-7b-tiny.yaml (the -tiny targets' dims)."""
    with open(os.path.join(ROOT, "conf", "model", "qwen2.5-7b-tiny.yaml")) as f:
        m = yaml.safe_load(f)
    return {"hidden_size": m["hidden_size"], "intermediate_size": m["intermediate_size"],
            "vocab_size": m["vocab_size"], "num_hidden_layers": m["num_layers"],
            "num_attention_heads": m["num_heads"], "num_key_value_heads": m["num_kv_heads"],
            "max_position_embeddings": m["max_position_embeddings"], "rope_theta": m["rope_theta"],
            "rms_norm_eps": m["norm_eps"]}


def layer_shapes(i: int, d: dict) -> dict[str, tuple[int, ...]]:
    p, h, f = f"model.layers.{i}.", d["hidden_size"], d["intermediate_size"]
    kv = d["num_key_value_heads"] * h // d["num_attention_heads"]
    return {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("out", help="output directory")
    ap.add_argument("--tiny", action="store_true",
                    help="dims of conf/model/qwen2.5-7b-tiny.yaml, random weights (else Qwen2.5-7B, zeros)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random --tiny weights")
    ap.add_argument("--layers", type=int, default=None, help="layers; None: 28, or 4 with --tiny")
    ap.add_argument("--shard-gb", type=float, default=3.5, help="largest safetensors file")
    args = ap.parse_args(argv)
    dims = tiny_dims() if args.tiny else dict(FULL)
    if args.layers is not None:
        dims["num_hidden_layers"] = args.layers
    os.makedirs(args.out, exist_ok=True)
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **dims,
              "tie_word_embeddings": False, "use_sliding_window": False, "torch_dtype": "bfloat16",
              **({} if args.tiny else {"bos_token_id": 151643, "eos_token_id": 151643})}
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    gen = torch.Generator().manual_seed(args.seed)

    def tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if not args.tiny:
            return torch.zeros(*shape, dtype=torch.bfloat16)
        if name.endswith("norm.weight"):
            return torch.ones(*shape, dtype=torch.bfloat16)
        return (torch.randn(*shape, generator=gen) * INIT_STD).to(torch.bfloat16)

    h, v = dims["hidden_size"], dims["vocab_size"]
    groups = ([{"model.embed_tokens.weight": (v, h)}]
              + [layer_shapes(i, dims) for i in range(dims["num_hidden_layers"])]
              + [{"model.norm.weight": (h,), "lm_head.weight": (v, h)}])
    shards, current = [], {}
    for group in groups:  # one group at a time in memory beyond the shard being filled
        current.update({name: tensor(name, shape) for name, shape in group.items()})
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
