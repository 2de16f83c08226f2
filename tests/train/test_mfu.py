"""Model FLOPs utilisation in the metrics: device peaks by name, `train.peak_tflops`, and the
`mfu` / `tflops_per_gpu` columns of a tiny CPU run."""
import json

import pytest
import torch

from data.config import DataConfig
from model.flops import ModelFlops
from tests.helpers import model_config
from train import RunConfig, run
from train.config import TrainConfig
from train.flops import device_peak_flops


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H200", 989.4e12), ("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_by_cuda_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert device_peak_flops(torch.device("cuda")) == peak
    assert device_peak_flops(torch.device("cuda"), peak_tflops=500.0) == 500e12


def test_no_peak_on_cpu_unless_set():
    assert device_peak_flops("cpu") is None
    assert device_peak_flops("cpu", 2.5) == 2.5e12


def test_peak_tflops_must_be_positive():
    with pytest.raises(ValueError, match="train.peak_tflops"):
        TrainConfig(peak_tflops=0.0)


def tiny_run(tmp_path, **train):
    cfg = RunConfig(model=model_config("sb7b-tiny"),
                    data=DataConfig(seq_len=64, demo_chars=200_000, vocab_size=512,
                                    cache_dir=str(tmp_path / "cache")),
                    train=TrainConfig(max_steps=3, global_batch=4, lr=3e-3, warmup_steps=1, log_every=1,
                                      run_dir=str(tmp_path / "run"), seed=7, **train))
    run(cfg)
    return cfg, [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]


def test_cpu_run_writes_mfu_when_the_peak_is_set(tmp_path):
    cfg, rows = tiny_run(tmp_path, peak_tflops=1.0)
    counts = ModelFlops(cfg.model)
    for r in rows:
        assert 0 < r["mfu"] < 1 and r["tflops_per_gpu"] > 0
        assert r["mfu"] == pytest.approx(r["tflops_per_gpu"] / 1.0)
        # FLOPs per token of the packed batch: at least the matmuls, at most one document per row
        per_token = r["tflops_per_gpu"] * 1e12 / r["tokens_per_s"]
        assert 6 * counts.active_matmul_weights < per_token <= counts.per_token(64) * (1 + 1e-9)


def test_cpu_run_without_a_peak_reports_throughput_only(tmp_path):
    _, rows = tiny_run(tmp_path)
    assert all("mfu" not in r and r["tflops_per_gpu"] > 0 for r in rows)
