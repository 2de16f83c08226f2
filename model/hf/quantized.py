"""W8ASpike exports: the Hugging Face-style layout of `model.hf.spikingbrain` with int8 weights.

A quantised projection keeps its float name for the int8 tensor and adds `<name>_scale`
(float32, one scale per group of `group_size` input features):
    model.layers.0.attn.q_proj.weight        int8    [O, I]
    model.layers.0.attn.q_proj.weight_scale  float32 [O, ceil(I / group_size)]
    model.layers.1.mlp.experts.gate_proj     int8    [E, F, D]   (and _scale [E, F, groups])
Everything else (embeddings, norms, biases, router, LM head) is stored in `dtype`. config.json
is the float model's plus a `quantization_config` entry:
    {"quant_method": "w8aspike", "bits": 8, "symmetric": true, "group_size": 128,
     "modules": [...], "spike": {"k": 3.0, "targets": [...]}, "calibration": {...}}
`load_quantized` rebuilds the model with spiking attached as `spike` says.
"""
from __future__ import annotations

import dataclasses

import torch

from ..config import ModelConfig
from .checkpoint import HFCheckpoint, ShardWriter, atomic_output_dir, copy_tokenizer_files, write_json
from .spikingbrain import from_hf_name, hf_config, model_config_from_hf, to_hf_name

QUANT_METHOD = "w8aspike"


def save_quantized(model, cfg: ModelConfig, dst: str, quantization: dict, *,
                   dtype: torch.dtype = torch.bfloat16, overwrite: bool = False,
                   max_shard_size="5GB", tokenizer_from: str | None = None) -> dict:
    """Writes a model quantised by `model.quant.quantize_model` to DST (atomically).

    quantization: `quant_method`, `group_size`, `modules`, `spike` {k, targets} and any
    `calibration` facts, stored as config.json's `quantization_config`. Returns the index.
    """
    names_int8 = {n for n, t in model.state_dict().items() if t.dtype == torch.int8}
    with atomic_output_dir(dst, overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_size)  # no cast: int8 and scales keep their dtypes
        for name, t in model.state_dict().items():
            if name.endswith("_scale") and name.removesuffix("_scale") in names_int8:
                writer.add(to_hf_name(name), t.float())
            elif t.is_floating_point():
                writer.add(to_hf_name(name), t.to(dtype))
            else:
                writer.add(to_hf_name(name), t)
        index = writer.finish()
        config = hf_config(cfg, dtype)
        config["quantization_config"] = {"quant_method": QUANT_METHOD, "bits": 8, "symmetric": True,
                                         **quantization}
        write_json(f"{tmp}/config.json", config)
        if tokenizer_from:
            copy_tokenizer_files(tokenizer_from, tmp)
    return index


def is_quantized(config: dict) -> bool:
    return (config.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD


def load_quantized(path: str, device: str | torch.device = "cpu", spiking: bool = True):
    """DST written by `save_quantized` -> (ModelConfig with its spike settings, model in eval
    mode with int8 projections and, unless `spiking` is False, spiking attached). Errors name
    the file at fault."""
    from ..decoder import build_model
    from ..quant import QUANT_TARGETS, quantize_model
    from ..spiking import attach_spiking

    ckpt = HFCheckpoint(path)
    q = ckpt.config.get("quantization_config") or {}
    if not is_quantized(ckpt.config):
        raise ValueError(f"{path}/config.json: not a {QUANT_METHOD} export (no quantization_config "
                         f"with quant_method {QUANT_METHOD!r})")
    try:
        group_size, modules = int(q["group_size"]), list(q["modules"])
        spike = dict(q["spike"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}/config.json: quantization_config is incomplete ({e!r})") from None
    cfg = model_config_from_hf(ckpt.config)
    cfg = dataclasses.replace(cfg, spike=dataclasses.replace(cfg.spike, enabled=False, **spike))
    # The structure is built and quantised on the meta device (nothing allocated or computed);
    # every tensor is then read from the files below.
    model = build_model(cfg, device="meta")
    targets = q.get("targets", QUANT_TARGETS)
    summary = quantize_model(model, group_size, targets)
    model.to_empty(device=device)
    if summary["quantized"] != modules:
        raise ValueError(f"{path}/config.json: quantization_config.modules does not match the "
                         f"modules that targets {targets} select in this model")
    expected = model.state_dict()
    found = {from_hf_name(n): n for n in ckpt.keys()}
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: tensors do not match the model: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    with torch.no_grad():
        for name, t in expected.items():
            src = ckpt.get(found[name])
            if src.shape != t.shape or (t.dtype == torch.int8) != (src.dtype == torch.int8):
                raise ValueError(f"{path}: tensor {found[name]} is {src.dtype} {tuple(src.shape)}, "
                                 f"the model expects {t.dtype} {tuple(t.shape)}")
            t.copy_(src)
    cfg = dataclasses.replace(cfg, spike=dataclasses.replace(cfg.spike, enabled=spiking))
    if spiking:
        attach_spiking(model, cfg.spike)
    return cfg, model.eval()
