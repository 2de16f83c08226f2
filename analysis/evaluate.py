"""Evaluation helpers shared by the analysis command lines (`launch/spikes.py`,
`launch/quantize.py`): load a trained model for inference, draw sample batches, measure loss.

A model comes from either
- a training checkpoint (`run_dir/checkpoints/step_NNNNNNNN`, or a run directory / `checkpoints/`
  folder standing for its newest checkpoint): weights plus the run's config, whose `data` section
  is the default sample text; or
- a Hugging Face-style directory written by `launch/convert.py` (`config.json` + safetensors):
  weights and model config only, so the sample text must be given (`data_path`).
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, replace

import torch

from data import DataConfig, build_loader, prepare_demo
from data.shards import read_manifest
from data.tokenizer import load_tokenizer
from model import build_model
from model.config import ModelConfig
from train.config import RunConfig
from train.export import read_checkpoint

log = logging.getLogger("train")


@dataclass
class Loaded:
    """A model ready for evaluation. `run` is the training run's config (None for an HF dir)."""

    model: torch.nn.Module
    model_cfg: ModelConfig
    run: RunConfig | None
    path: str


def load_model(path: str, device: str | torch.device = "cpu", *, spike: bool | None = None) -> Loaded:
    """The model stored at `path` (see the module doc), in eval mode, fp32 on `device`; a
    W8ASpike export (`launch/quantize.py`) comes back quantised, with its spiking attached
    unless `spike` is False.

    `spike` overrides `model.spike.enabled` (None: as stored). Errors name the file at fault.
    """
    if os.path.isfile(os.path.join(path, "config.json")):
        from model.hf import load_hf_checkpoint
        from model.hf.checkpoint import read_config
        from model.hf.quantized import is_quantized, load_quantized

        if is_quantized(read_config(path)):  # W8ASpike export: int8 weights
            cfg, model = load_quantized(path, device, spiking=spike is not False)
            return Loaded(model, cfg, None, path)
        cfg, state = load_hf_checkpoint(path)
        run = None
    else:
        path, run, state = read_checkpoint(path)
        cfg = run.model
    if spike is not None:
        cfg = replace(cfg, spike=replace(cfg.spike, enabled=spike))
    model = build_model(cfg, device=device, init=False)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match the model config ({e})") from None
    model.eval()
    return Loaded(model, cfg, run, path)


def data_config(loaded: Loaded, data_path: str | None = None, seq_len: int | None = None) -> DataConfig:
    """The sample text: token shards at `data_path` (from `launch/prepare_data.py`), else the
    training run's own data. `seq_len` overrides the sample length."""
    if data_path:
        if not os.path.isfile(os.path.join(data_path, "manifest.json")):
            raise ValueError(f"--data {data_path}: not a token shard directory (no manifest.json); "
                             f"make one with launch/prepare_data.py")
        check_sample_tokenizer(loaded, data_path)
        cfg = DataConfig(name="shards", path=data_path, seq_len=seq_len or 256)
    elif loaded.run is None:
        raise ValueError(f"{loaded.path} holds no training run config, so there is no default sample "
                         f"text: pass --data with token shards made by its tokenizer")
    else:
        cfg = replace(loaded.run.data, prefetch=0)
        if seq_len:
            cfg = replace(cfg, seq_len=seq_len)
    return cfg


def check_sample_tokenizer(loaded: Loaded, data_path: str) -> None:
    """Refuse shards at `data_path` made by another tokenizer than the model's (its training
    data's, or the tokenizer files of a converted directory); warn when that is unknown."""
    shards = read_manifest(data_path)["tokenizer"]
    ours = model_tokenizer_fingerprint(loaded)
    if ours is None:
        log.warning("--data %s: the tokenizer of %s is unknown (no tokenizer files, or its training "
                    "data moved), so nothing shows that these shards (tokenizer %s) were made with it",
                    data_path, loaded.path, shards["path"])
    elif ours != shards["fingerprint"]:
        raise ValueError(f"--data {data_path} was tokenized by another tokenizer ({shards['kind']} "
                         f"{shards['path']}) than the model {loaded.path} was trained with; "
                         f"prepare it with the model's tokenizer")


def model_tokenizer_fingerprint(loaded: Loaded) -> str | None:
    """Fingerprint of the tokenizer the model's tokens come from: the tokenizer files of a
    converted directory, else the training run's data; None where unknown."""
    try:
        if loaded.run is None:
            return load_tokenizer(loaded.path).fingerprint
        data = loaded.run.data
        if data.tokenizer:
            return load_tokenizer(data.tokenizer).fingerprint
        if data.name == "shards":
            return read_manifest(data.source_specs()[0].path)["tokenizer"]["fingerprint"]
        return prepare_demo(data).tokenizer.fingerprint
    except (OSError, ValueError):  # no tokenizer files, or the run's data moved
        return None


def sample_batches(cfg: DataConfig, samples: int, *, batch_size: int = 8, seed: int = 0,
                   skip: int = 0, vocab_size: int | None = None) -> list[dict[str, torch.Tensor]]:
    """`samples` packed sequences ([b, L] batches of at most `batch_size`, CPU), after the first
    `skip` sequences of the stream seeded with `seed`: calibration and evaluation sets drawn with
    different `skip` do not overlap."""
    if samples < 1:
        raise ValueError(f"the number of samples must be >= 1, got {samples}")
    loader = build_loader(cfg, seed=seed, global_batch=1)
    try:
        if vocab_size is not None:
            loader.check_vocab(vocab_size)
        rows = [loader.next_batch() for _ in range(skip + samples)][skip:]
    finally:
        loader.close()
    return [{k: torch.cat([r[k] for r in rows[i:i + batch_size]]) for k in rows[0]}
            for i in range(0, samples, batch_size)]


def autocast(device: torch.device):
    """bf16 autocast on CUDA (as in training), nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches) -> dict:
    """Mean next-token loss over every target token of `batches`: {"loss", "tokens"}."""
    device = next(model.parameters()).device
    loss_sum, tokens = 0.0, 0
    for batch in batches:
        with autocast(device):
            out = model(batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                        labels=batch["labels"].to(device))
        loss_sum += float(out.loss_sum)
        tokens += int(out.num_tokens)
    return {"loss": loss_sum / max(tokens, 1), "tokens": tokens}


def add_cli_args(ap, samples: int, samples_help: str) -> None:
    """The arguments the analysis command lines share: CHECKPOINT, --data, --samples, --seq-len,
    --batch-size, --k, --seed, --device, --overwrite."""
    ap.add_argument("checkpoint", help="training checkpoint, run directory or converted directory")
    ap.add_argument("--data", default=None, help="token shard directory (launch/prepare_data.py) "
                    "made with the model's tokenizer; None: the training run's own data")
    ap.add_argument("--samples", type=int, default=samples, help=samples_help)
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence; None: the run's "
                    "data.seq_len (256 with --data)")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    ap.add_argument("--k", type=float, default=None, help="spike threshold divisor; None: model.spike.k")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sample stream")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto: CUDA when there is one")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def resolve_device(choice: str) -> str:
    """--device auto|cpu|cuda -> "cpu" or "cuda"; asking for CUDA without one is an error."""
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device on this machine")
    return choice
