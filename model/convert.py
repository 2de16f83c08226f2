"""Conversion of a Qwen-style Hugging Face checkpoint into a SpikingBrain one (streaming).

The target takes its dims from the source config and its layer plan, GLA, MoE and hybrid
settings from a template ModelConfig (conf/model/sb7b.yaml or sb76b.yaml). For a source with fewer
layers than the template, the plan's repeating pattern is applied to the source's layer count and
only the per-layer overrides (`mixer_at`, `ffn_at`, 0-based) whose index exists are kept; e.g. an
8-layer source under sb76b gets dense FFNs at 0, 1, 2, 4, 6, MoE at 3, 5, 7 and gla+full at 6.

Rules (SPIKINGBRAIN.md, "Conversion-based continual pretraining"):
- embeddings, norms, dense FFNs and lm_head are copied;
- every layer's q/k/v (with biases) and o are reused by its GLA / SWA / full / hybrid mixer (by
  both branches of a hybrid; copied into `gla_*_proj` when the branches do not share them);
- new parameters: low-rank gate `gk_proj.0/1` xavier-uniform with gain 2^-2.5 and zero bias,
  `g_norm`/`s_norm` ones, sink tokens normal(0, SINK_STD), router normal(0, ROUTER_STD), all from
  one generator seeded with `seed`, drawn layer by layer (independent of sharding);
- MoE upcycling: every routed expert and each shared expert is the dense FFN with each of its
  three matrices scaled by `upcycle_alpha(S, k, N)`.
Only one source layer (and one output shard) is in memory at a time.
"""
from __future__ import annotations

import dataclasses
import os
import time

import torch

from .config import LayerPlan, ModelConfig
from .hf.checkpoint import HFCheckpoint, ShardWriter, atomic_output_dir, copy_tokenizer_files, write_json
from .hf.qwen2 import qwen2_config
from .hf.remote import write_remote_code
from .hf.spikingbrain import _expected_shapes, fits_gla_swa, hf_config, to_hf_name
from .hf.tokenizer import write_tokenizer
from .mixers.gla import GLA_INIT_GAIN

SINK_STD = 0.02      # as Decoder.init_weights for sinks
ROUTER_STD = 1e-3    # small, so routing starts near uniform (p_top1 ~ k/N, the alpha assumption)
DROPPED = ("rotary_emb.inv_freq",)  # source tensors deliberately not converted (suffixes)
QWEN2 = ("Qwen2ForCausalLM",)  # the config.json architectures a source may name (or none)


def upcycle_alpha(num_shared: int, top_k: int, num_experts: int) -> float:
    """alpha = (1 / (S + k/N))^(1/3): scale of each expert matrix at upcycling (0.98 for 1, 1, 16)."""
    return (1.0 / (num_shared + top_k / num_experts)) ** (1.0 / 3.0)


def source_config(hf: dict, path: str) -> ModelConfig:
    """Qwen2 config.json dict -> ModelConfig; errors name the file."""
    where = os.path.join(path, "config.json")
    # both: a config can say model_type qwen2 and name another class (e.g. MistralForCausalLM)
    if hf.get("model_type") != "qwen2" or not set(hf.get("architectures") or QWEN2) <= set(QWEN2):
        raise ValueError(f"{where}: unknown architecture model_type={hf.get('model_type')!r} "
                         f"(architectures={hf.get('architectures')}); only qwen2 sources "
                         f"({', '.join(QWEN2)}) convert")
    try:
        heads, kv = hf["num_attention_heads"], hf.get("num_key_value_heads", hf["num_attention_heads"])
        if not hf.get("head_dim") and hf["hidden_size"] % heads:
            raise ValueError(f"hidden_size={hf['hidden_size']} is not divisible by num_attention_heads={heads}")
        if kv < 1 or heads % kv:
            raise ValueError(f"num_attention_heads={heads} is not divisible by num_key_value_heads={kv}")
        return qwen2_config(hf)
    except KeyError as e:
        raise ValueError(f"{where}: missing field {e}") from None
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def target_config(src: ModelConfig, template: ModelConfig, sliding_window: int | None = None) -> ModelConfig:
    """Source dims + the template's plan (overrides beyond the source's layers dropped) and settings."""
    n = src.num_layers
    plan = template.layer_plan
    keep = lambda at: {int(i): v for i, v in at.items() if int(i) < n}  # noqa: E731
    if template.moe.expert_size not in (0, src.intermediate_size):
        raise ValueError(f"model.moe.expert_size={template.moe.expert_size}: upcycling copies the dense "
                         f"FFN, so experts must have the source's intermediate_size={src.intermediate_size}")
    return dataclasses.replace(
        src, name=template.name, sliding_window=sliding_window or template.sliding_window,
        max_position_embeddings=max(template.max_position_embeddings, src.max_position_embeddings),
        layer_plan=LayerPlan(mixer=list(plan.mixer), ffn=list(plan.ffn), mixer_at=keep(plan.mixer_at),
                             ffn_at=keep(plan.ffn_at)),
        gla=dataclasses.replace(template.gla), moe=dataclasses.replace(template.moe, expert_size=0),
        hybrid=dataclasses.replace(template.hybrid))


class _Converter:
    def __init__(self, ckpt: HFCheckpoint, cfg: ModelConfig, writer: ShardWriter, seed: int):
        self.ckpt, self.cfg, self.writer = ckpt, cfg, writer
        self.gen = torch.Generator().manual_seed(seed)
        self.used: set[str] = set()
        self.expected = _expected_shapes(cfg)
        self.written: list[str] = []

    def take(self, hf_name: str) -> torch.Tensor:
        self.used.add(hf_name)
        return self.ckpt.get(hf_name).float()

    def put(self, ours: str, t: torch.Tensor) -> None:
        if ours not in self.expected or tuple(t.shape) != self.expected[ours]:
            raise ValueError(f"conversion produced {ours} {tuple(t.shape)}, the model expects "
                             f"{self.expected.get(ours)}")
        self.writer.add(to_hf_name(ours), t)
        self.written.append(ours)

    def xavier(self, shape) -> torch.Tensor:
        return torch.nn.init.xavier_uniform_(torch.empty(shape), gain=GLA_INIT_GAIN, generator=self.gen)

    def normal(self, shape, std) -> torch.Tensor:
        return torch.empty(shape).normal_(0.0, std, generator=self.gen)

    def layer(self, i: int) -> None:
        cfg, src, dst = self.cfg, f"model.layers.{i}.", f"layers.{i}."
        mixer, ffn = cfg.mixers[i], cfg.ffns[i]
        self.put(dst + "attn_norm.weight", self.take(src + "input_layernorm.weight"))
        self.put(dst + "mlp_norm.weight", self.take(src + "post_attention_layernorm.weight"))
        prefixes = [""] if "+" not in mixer or cfg.hybrid.shared_qkvo else ["", "gla_"]
        for name in ("q", "k", "v", "o"):
            suffixes = ("weight", "bias") if name != "o" and cfg.qkv_bias else ("weight",)
            for s in suffixes:
                t = self.take(f"{src}self_attn.{name}_proj.{s}")
                for p in prefixes:
                    self.put(f"{dst}attn.{p}{name}_proj.{s}", t)
        if "gla" in mixer:
            if cfg.gla.gate == "lowrank":
                r = cfg.gla.gate_rank
                self.put(dst + "attn.gk_proj.0.weight", self.xavier((r, cfg.hidden_size)))
                self.put(dst + "attn.gk_proj.1.weight", self.xavier((cfg.kv_dim, r)))
                self.put(dst + "attn.gk_proj.1.bias", torch.zeros(cfg.kv_dim))
            self.put(dst + "attn.g_norm.weight", torch.ones(cfg.head_dim))
        if "+" in mixer:
            self.put(dst + "attn.s_norm.weight", torch.ones(cfg.head_dim))
            if cfg.hybrid.num_sinks:
                self.put(dst + "attn.sinks", self.normal((cfg.hybrid.num_sinks, cfg.hidden_size), SINK_STD))
        dense = {n: self.take(f"{src}mlp.{n}_proj.weight") for n in ("gate", "up", "down")}
        if ffn == "dense":
            for n, t in dense.items():
                self.put(f"{dst}mlp.{n}_proj.weight", t)
            return
        m = cfg.moe
        a = upcycle_alpha(m.num_shared, m.top_k, m.num_experts)
        self.put(dst + "mlp.router.weight", self.normal((m.num_experts, cfg.hidden_size), ROUTER_STD))
        for n, t in dense.items():
            self.put(f"{dst}mlp.experts.{n}_proj", (a * t).unsqueeze(0).expand(m.num_experts, *t.shape))
            if m.num_shared:  # S shared experts side by side = one SwiGLU of width S * F
                self.put(f"{dst}mlp.shared.{n}_proj.weight", torch.cat([a * t] * m.num_shared, dim=1 if n == "down" else 0))

    def run(self) -> None:
        cfg = self.cfg
        self.put("embeddings.weight", self.take("model.embed_tokens.weight"))
        for i in range(cfg.num_layers):
            self.layer(i)
        self.put("norm.weight", self.take("model.norm.weight"))
        if not cfg.tie_word_embeddings:
            self.put("lm_head.weight", self.take("lm_head.weight"))
        missing = sorted(set(self.expected) - set(self.written))
        if missing:
            raise ValueError(f"conversion did not produce {missing}")

    def dropped(self) -> list[str]:
        left = sorted(set(self.ckpt.keys()) - self.used)
        tied_head = ["lm_head.weight"] if self.cfg.tie_word_embeddings else []
        unknown = [n for n in left if not n.endswith(DROPPED) and n not in tied_head]
        if unknown:
            raise ValueError(f"{self.ckpt.path}: source tensors not understood by the conversion: {unknown[:8]}")
        return left


def convert(src: str, dst: str, template: ModelConfig, target: str, *, dtype: torch.dtype = torch.bfloat16,
            overwrite: bool = False, max_shard_size="5GB", sliding_window: int | None = None,
            seed: int = 0) -> dict:
    """SRC (Qwen2 HF dir) -> DST (SpikingBrain HF dir), `target` naming the template (a
    conf/model name). A plan of gla/swa mixers and dense FFNs (sb7b, sb7b-tiny) is written in the
    official gla_swa layout, any other (sb76b, sb76b-tiny) in the spikingbrain_moe layout.
    Returns a summary."""
    start = time.time()
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("DST must differ from SRC")
    ckpt = HFCheckpoint(src)
    cfg = target_config(source_config(ckpt.config, src), template, sliding_window)
    if target.startswith("sb7b") and not fits_gla_swa(cfg):
        raise ValueError(f"target {target} needs a plan of gla/swa mixers and dense FFNs (the gla_swa layout)")
    with atomic_output_dir(dst, overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_size, dtype)
        conv = _Converter(ckpt, cfg, writer, seed)
        conv.run()
        dropped = conv.dropped()
        index = writer.finish()
        ids = {k: ckpt.config[k] for k in ("bos_token_id", "eos_token_id") if ckpt.config.get(k) is not None}
        write_json(os.path.join(tmp, "config.json"), hf_config(cfg, dtype, extra=ids))
        write_remote_code(tmp)  # AutoModelForCausalLM.from_pretrained(DST, trust_remote_code=True)
        tokenizer = copy_tokenizer_files(src, tmp)
    m = cfg.moe
    return {"target": target, "layers": cfg.num_layers, "mixers": cfg.mixers, "ffns": cfg.ffns,
            "tensors": len(conv.written), "bytes": index["metadata"]["total_size"],
            "shards": len(set(index["weight_map"].values())), "dropped": dropped,
            "tokenizer_files": tokenizer, "dtype": str(dtype).removeprefix("torch."),
            "alpha": upcycle_alpha(m.num_shared, m.top_k, m.num_experts) if "moe" in cfg.ffns else None,
            "seconds": round(time.time() - start, 3)}


def save_hf_checkpoint(state: dict, cfg: ModelConfig, dst: str, *, dtype: torch.dtype = torch.bfloat16,
                       overwrite: bool = False, max_shard_size="5GB", tokenizer_from: str | None = None) -> dict:
    """Our state dict (names as Decoder.state_dict()) -> DST in the layout `hf_config` picks, with
    the modeling files for transformers and the tokenizer `tokenizer_from` (`write_tokenizer`)."""
    expected = _expected_shapes(cfg)
    if set(state) != set(expected):
        raise ValueError(f"state dict does not match the config: missing {sorted(set(expected) - set(state))[:8]}, "
                         f"unexpected {sorted(set(state) - set(expected))[:8]}")
    with atomic_output_dir(dst, overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_size, dtype)
        for name in expected:  # model order: embeddings, layers, norm, head
            writer.add(to_hf_name(name), state[name])
        index = writer.finish()
        write_json(os.path.join(tmp, "config.json"), hf_config(cfg, dtype))
        write_remote_code(tmp)
        if tokenizer_from:
            write_tokenizer(tokenizer_from, tmp)
    return index
