"""The training loop on CPU: reproducibility, gradient accumulation, metrics, learning."""
import json
import os

import pytest

from data.config import DataConfig
from parallel import Mesh, ParallelConfig
from tests.helpers import model_config
from train import RunConfig, build, run
from train.config import TrainConfig


@pytest.fixture(scope="module")
def data_cfg(tmp_path_factory):
    return DataConfig(seq_len=64, demo_chars=200_000, vocab_size=512,
                      cache_dir=str(tmp_path_factory.mktemp("cache")))


def make_cfg(data_cfg, tmp_path, model="sb7b-tiny", **train):
    base = dict(max_steps=4, global_batch=4, lr=3e-3, warmup_steps=2, log_every=1,
                run_dir=str(tmp_path / "run"), seed=7)
    base.update(train)
    return RunConfig(model=model_config(model), data=data_cfg, train=TrainConfig(**base))


def losses(cfg):
    trainer = build(cfg, Mesh(ParallelConfig(), "cpu"))
    return [row["loss"] for row in trainer.fit()]


@pytest.mark.parametrize("model", ["sb7b-tiny", "sb76b-tiny"])
def test_same_seed_same_losses(data_cfg, tmp_path, model):
    a = losses(make_cfg(data_cfg, tmp_path / "a", model))
    b = losses(make_cfg(data_cfg, tmp_path / "b", model))
    assert a == b
    c = losses(make_cfg(data_cfg, tmp_path / "c", model, seed=8))
    assert a != c


def test_gradient_accumulation_matches_one_big_batch(data_cfg, tmp_path):
    whole = losses(make_cfg(data_cfg, tmp_path / "a", micro_batch=0))
    accumulated = losses(make_cfg(data_cfg, tmp_path / "b", micro_batch=1))
    assert accumulated == pytest.approx(whole, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("balance", ["global", "micro"])
def test_moe_balance_loss_counts_the_whole_global_batch(data_cfg, tmp_path, balance):
    """model.moe.balance=global: accumulation leaves every update unchanged (the expert load is
    counted over all micro-batches); micro (each micro-batch's own load) does not."""
    moe = {"num_experts": 4, "top_k": 1, "num_shared": 1, "aux_loss_coef": 0.1, "balance": balance}

    def trained(micro_batch):
        cfg = make_cfg(data_cfg, tmp_path / f"m{micro_batch}", "sb76b-tiny", max_steps=2, micro_batch=micro_batch)
        cfg.model = model_config("sb76b-tiny", moe=moe)
        trainer = build(cfg, Mesh(ParallelConfig(), "cpu"))
        trainer.fit()
        trainer.loader.close()
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    whole, accumulated = trained(0), trained(1)
    diff = max(float((whole[n] - accumulated[n]).abs().max()) for n in whole if ".router." in n)
    if balance == "global":
        assert diff < 2e-6
    else:
        assert diff > 1e-4


def test_metrics_file_and_resolved_config(data_cfg, tmp_path):
    cfg = make_cfg(data_cfg, tmp_path, max_steps=5, log_every=2)
    run(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 4, 5]
    for r in rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= set(r)
    assert rows[-1]["tokens"] == 5 * 4 * 64
    assert os.path.exists(tmp_path / "run" / "config.yaml")


def test_tokenizer_larger_than_model_vocab_is_refused(data_cfg, tmp_path):
    cfg = make_cfg(data_cfg, tmp_path)
    cfg.model = model_config("sb7b-tiny", vocab_size=256)
    with pytest.raises(ValueError, match="model.vocab_size"):
        build(cfg, Mesh(ParallelConfig(), "cpu"))


def test_micro_batch_must_divide_the_batch(data_cfg, tmp_path):
    with pytest.raises(ValueError, match="train.micro_batch"):
        build(make_cfg(data_cfg, tmp_path, micro_batch=3), Mesh(ParallelConfig(), "cpu"))


@pytest.mark.parametrize("model", ["qwen2.5-7b-tiny", "sb7b-tiny", "sb76b-tiny"])
def test_loss_falls(data_cfg, tmp_path, model):
    rows = losses(make_cfg(data_cfg, tmp_path, model, max_steps=40, global_batch=8, warmup_steps=5,
                           lr=5e-3))
    assert rows[-1] < 0.75 * rows[0]
