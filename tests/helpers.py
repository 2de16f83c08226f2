"""Shared test helpers (import as `tests.helpers`)."""
import os

import yaml

from model.config import ModelConfig
from train.config import from_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_config(name: str, **overrides) -> ModelConfig:
    """conf/model/NAME.yaml as a ModelConfig, with top-level fields overridden."""
    with open(os.path.join(ROOT, "conf", "model", f"{name}.yaml")) as f:
        data = yaml.safe_load(f)
    data.update(overrides)
    return from_dict(ModelConfig, data, "model")


def tiny_qwen2(seed: int = 0, *, tie: bool = False, vocab_size: int = 503, hidden_size: int = 96,
               intermediate_size: int = 200, num_layers: int = 3, num_heads: int = 6,
               num_kv_heads: int = 2):
    """A random Hugging Face Qwen2ForCausalLM (fp32, eager attention) with random biases and norm
    scales too, so every tensor matters in comparisons."""
    import torch
    import transformers

    cfg = transformers.Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=512, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=tie,
        use_sliding_window=False, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    return model


def train_tiny(run_dir: str, cache_dir: str, model: str = "sb7b-tiny", steps: int = 6, **spike) -> str:
    """Trains conf/model/MODEL.yaml for `steps` steps on a small demo corpus (vocab 512, 64-token
    samples) and returns `run_dir`, which then holds a checkpoint. `spike` overrides
    model.spike (e.g. enabled=True, k=2.0)."""
    import dataclasses

    from data.config import DataConfig
    from train import RunConfig, run
    from train.config import TrainConfig

    cfg = model_config(model)
    if spike:
        cfg = dataclasses.replace(cfg, spike=dataclasses.replace(cfg.spike, **spike))
    data = DataConfig(seq_len=64, demo_chars=200_000, vocab_size=512, cache_dir=cache_dir)
    train = TrainConfig(max_steps=steps, global_batch=4, lr=3e-3, warmup_steps=2, log_every=steps,
                        run_dir=run_dir, seed=7)
    run(RunConfig(model=cfg, data=data, train=train))
    return run_dir


def stop_after(trainer, step: int) -> None:
    """Makes `trainer` stop (and save) once `step` is done, as a stop signal would."""
    train_step = trainer.train_step

    def stopping_step():
        out = train_step()
        if trainer.step == step:
            trainer.request_stop("test stop")
        return out
    trainer.train_step = stopping_step


def run_triton_script(script: str, device: str, timeout: int) -> None:
    """Runs `script` in a fresh Python (under the Triton interpreter when device is "cpu", which
    must be set before triton is imported) and asserts it exited cleanly printing "CASES OK"."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = ROOT
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0 and "CASES OK" in proc.stdout, proc.stdout + proc.stderr
