"""W8ASpike post-training quantisation of a trained model: calibrate, evaluate, export.

    report = w8aspike(checkpoint, dst, samples=128)

1. Load the model (training checkpoint, run directory or converted directory; `analysis.evaluate`).
2. Draw `samples` calibration sequences and, after them in the same stream, `eval_samples`
   evaluation sequences, so the two sets never overlap.
3. With spiking attached at k, measure E[x^2] of every projection's (spiked) input on the
   calibration set; quantise the weights to INT8 with per-group scales whose clip ratios
   minimise the activation-weighted error (`model.quant`). No gradient step anywhere.
4. Evaluate the loss on the evaluation set for: the float model, float + spiking, INT8 weights
   alone, W8ASpike with plain max scaling, and calibrated W8ASpike; write the calibrated model
   to DST (`model.hf.quantized`) and `w8aspike_report.json` inside it.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from model.hf.checkpoint import check_output_dir, write_json
from model.hf.quantized import QUANT_METHOD, save_quantized
from model.quant import CLIP_RATIOS, QUANT_TARGETS, input_importance, quantize_model
from model.spiking import attach_spiking, detach_spiking
from .evaluate import data_config, evaluate_loss, load_model, sample_batches

REPORT_FILE = "w8aspike_report.json"


def w8aspike(checkpoint: str, dst: str, *, data_path: str | None = None, samples: int = 128,
             eval_samples: int = 64, seq_len: int | None = None, batch_size: int = 8,
             group_size: int = 128, k: float | None = None, targets=QUANT_TARGETS, seed: int = 0,
             device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
             overwrite: bool = False) -> dict:
    """Quantises CHECKPOINT into DST and returns the report (also written to DST)."""
    if group_size < 1:
        raise ValueError(f"--group-size must be >= 1, got {group_size}")
    if k is not None and not k > 0:
        raise ValueError(f"--k must be > 0, got {k}")
    if eval_samples < 1:
        raise ValueError(f"--eval-samples must be >= 1, got {eval_samples}")
    dst = check_output_dir(dst, overwrite)  # before the slow part
    loaded = load_model(checkpoint, device, spike=False)
    model, cfg = loaded.model, loaded.model_cfg
    spike = dataclasses.replace(cfg.spike, enabled=True, k=float(k if k is not None else cfg.spike.k))
    data = data_config(loaded, data_path, seq_len)
    draw = dict(batch_size=batch_size, seed=seed, vocab_size=cfg.vocab_size)
    calib = sample_batches(data, samples, **draw)
    evals = sample_batches(data, eval_samples, skip=samples, **draw)

    first = evaluate_loss(model, evals)
    losses, tokens = {"float": first["loss"]}, first["tokens"]
    handles = attach_spiking(model, spike)
    losses["spike"] = evaluate_loss(model, evals)["loss"]
    importance = input_importance(model, calib, targets)
    detach_spiking(model, handles)
    summary = quantize_model(model, group_size, targets, importance)
    losses["w8"] = evaluate_loss(model, evals)["loss"]
    attach_spiking(model, spike)
    losses["w8aspike"] = evaluate_loss(model, evals)["loss"]

    baseline = load_model(checkpoint, device, spike=False).model  # max scaling, no calibration
    quantize_model(baseline, group_size, targets)
    attach_spiking(baseline, spike)
    losses["w8aspike_uncalibrated"] = evaluate_loss(baseline, evals)["loss"]
    del baseline

    calibration = {"samples": samples, "seq_len": data.seq_len, "seed": seed,
                   "method": "activation-weighted per-group clip search", "clip_ratios": list(CLIP_RATIOS),
                   "mean_clip": summary["mean_clip"]}
    quantization = {"group_size": group_size, "targets": list(targets), "modules": summary["quantized"],
                    "spike": {"k": spike.k, "targets": list(spike.targets)}, "calibration": calibration}
    init_from = loaded.run.train.init_from if loaded.run else None
    index = save_quantized(model, cfg, dst, quantization, dtype=dtype, overwrite=overwrite,
                           tokenizer_from=init_from if init_from and os.path.isdir(init_from) else None)
    report = {
        "checkpoint": loaded.path, "exported": dst, "model": cfg.name, "quant_method": QUANT_METHOD,
        "group_size": group_size, "k": spike.k, "params": {"int8": summary["int8_params"], "float": sum(p.numel() for p in model.parameters())},
        "modules": len(summary["quantized"]),
        "bytes": index["metadata"]["total_size"], "calibration": calibration,
        "eval": {"samples": eval_samples, "tokens": tokens, "skip": samples},
        "loss": losses,
        "delta": {name: losses[name] - losses["float"] for name in losses if name != "float"},
        "relative_pct": {name: 100 * (losses[name] / losses["float"] - 1) for name in losses
                         if name != "float"},
    }
    write_json(os.path.join(dst, REPORT_FILE), report)
    return report
