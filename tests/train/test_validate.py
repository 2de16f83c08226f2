"""Validation loss during training (train.eval_every on the data.val_docs split): the rows it
appears in, that it equals the model's loss on the held-out documents computed directly, that it
does not change training, resumes exactly, is the same on 1 and 2 gloo ranks (data and sequence
parallel, ZeRO 1 and 3), and that bad settings are refused naming them."""
import json
import logging

import pytest
import torch
import torch.nn.functional as F

from data.config import DataConfig
from model.context import SequenceContext
from model.decoder import IGNORE_INDEX
from parallel import Mesh, ParallelConfig
from tests.helpers import model_config, stop_after
from tests.parallel.ranks import run_ranks
from train import RunConfig, build
from train.config import TrainConfig, from_dict
from train.metrics import MetricsLogger

VAL_DOCS = 4  # about 800 tokens of the small demo corpus: 13 samples of 64


@pytest.fixture(scope="module")
def data_cfg(tmp_path_factory):
    return DataConfig(seq_len=64, demo_chars=200_000, vocab_size=512, val_docs=VAL_DOCS,
                      cache_dir=str(tmp_path_factory.mktemp("cache")))


def make_cfg(data_cfg, run_dir, **train):
    base = dict(max_steps=7, global_batch=4, lr=3e-3, warmup_steps=2, log_every=1, eval_every=3,
                run_dir=str(run_dir), seed=7)
    base.update(train)
    return RunConfig(model=model_config("sb7b-tiny"), data=data_cfg, train=TrainConfig(**base))


def fit(cfg, stop=None):
    trainer = build(cfg, Mesh(ParallelConfig(), "cpu"))
    if stop is not None:
        stop_after(trainer, stop)
    try:
        return trainer, trainer.fit()
    finally:
        trainer.loader.close()


def direct_val_loss(trainer) -> float:
    """Mean token loss over the validation samples, one sample at a time, from the logits."""
    data = trainer.loader.validation_set()
    batch = data.samples(0, data.num_samples)
    total, targets = 0.0, 0
    trainer.model.eval()
    with torch.no_grad():
        for i in range(data.num_samples):
            ids, labels, pos = (torch.from_numpy(batch[k][i:i + 1]) for k in ("input_ids", "labels", "position_ids"))
            logits = trainer.model(ids, ctx=SequenceContext.from_position_ids(pos)).logits
            total += float(F.cross_entropy(logits[0].double(), labels[0], ignore_index=IGNORE_INDEX, reduction="sum"))
            targets += int((labels != IGNORE_INDEX).sum())
    trainer.model.train()
    assert targets == data.targets
    return total / targets


def test_val_loss_rows_and_the_direct_loss(data_cfg, tmp_path):
    trainer, rows = fit(make_cfg(data_cfg, tmp_path / "eval"))
    assert [r["step"] for r in rows] == list(range(1, 8))
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6, 7]  # every 3 steps and the last
    assert trainer.model.training  # back in train mode
    # the last evaluation ran on the final weights: it equals the direct computation
    assert rows[-1]["val_loss"] == pytest.approx(direct_val_loss(trainer), rel=1e-5)
    assert rows[-1]["val_loss"] < rows[2]["val_loss"]  # it learned
    logged = [json.loads(line) for line in open(tmp_path / "eval" / "metrics.jsonl")]
    assert [r.get("val_loss") for r in logged] == [r.get("val_loss") for r in rows]
    # evaluation changes nothing in training: the same losses as a run without it
    _, plain = fit(make_cfg(data_cfg, tmp_path / "plain", eval_every=0))
    assert [r["loss"] for r in plain] == [r["loss"] for r in rows]
    assert not any("val_loss" in r for r in plain)


def test_an_evaluation_step_gets_its_own_row(data_cfg, tmp_path):
    _, rows = fit(make_cfg(data_cfg, tmp_path, max_steps=5, log_every=4, eval_every=3))
    assert [(r["step"], "val_loss" in r) for r in rows] == [(1, False), (3, True), (4, False), (5, True)]


def test_exact_resume_with_evaluation(data_cfg, tmp_path):
    cfg = make_cfg(data_cfg, tmp_path / "whole", max_steps=6, eval_every=2)
    _, whole = fit(cfg)
    cut = make_cfg(data_cfg, tmp_path / "cut", max_steps=6, eval_every=2)
    _, first = fit(cut, stop=3)
    _, second = fit(cut)
    assert [r["step"] for r in first + second] == list(range(1, 7))
    for key in ("loss", "val_loss"):
        assert [r.get(key) for r in first + second] == [r.get(key) for r in whole]


def test_evaluation_time_is_not_throughput(data_cfg, tmp_path, monkeypatch):
    """The validator hands its time to the metrics window, which leaves it out of tokens/s."""
    clock = [100.0]
    monkeypatch.setattr("train.metrics.time.perf_counter", lambda: clock[0])
    metrics = MetricsLogger(str(tmp_path), False, 10)
    metrics.add(1.0, 600)
    clock[0] += 10.0
    metrics.exclude(4.0)
    assert metrics.flush(1, 0.1, 1.0, 600)["tokens_per_s"] == pytest.approx(100.0)
    monkeypatch.undo()  # the real clock again (the patch was on the shared time module)
    trainer = build(make_cfg(data_cfg, tmp_path / "run", max_steps=3), Mesh(ParallelConfig(), "cpu"))
    excluded = []
    monkeypatch.setattr(trainer.metrics, "exclude", excluded.append)
    trainer.fit()
    trainer.loader.close()
    assert len(excluded) == 1 and excluded[0] > 0  # the one evaluation, at step 3


def test_bad_settings_are_refused(data_cfg, tmp_path, caplog):
    with pytest.raises(ValueError, match="train.eval_every must be >= 0"):
        TrainConfig(eval_every=-1)
    with pytest.raises(ValueError, match="train.eval_every must be an integer"):
        from_dict(TrainConfig, {"eval_every": "often"}, "train")
    # asked for evaluation without a split: said once, no val_loss
    no_split = DataConfig(seq_len=64, demo_chars=200_000, vocab_size=512, cache_dir=data_cfg.cache_dir)
    caplog.set_level(logging.WARNING, logger="train")
    cfg = make_cfg(no_split, tmp_path, max_steps=3)
    _, rows = fit(cfg)
    assert "train.eval_every=3 but the data has no validation split (data.val_docs=0)" in caplog.text
    assert not any("val_loss" in r for r in rows)


# -- 1 and 2 gloo ranks ---------------------------------------------------------------------------

def worker(specs: list[dict]) -> list[list[tuple]]:
    """Each spec (tests.parallel.workers.make_config) trained; (step, loss, val_loss) rows."""
    from tests.parallel.workers import make_config

    out = []
    for spec in specs:
        cfg = make_config(spec)
        trainer = build(cfg, Mesh(cfg.parallel, "cpu"))
        try:
            out.append([(r["step"], r["loss"], r.get("val_loss")) for r in trainer.fit()])
        finally:
            trainer.loader.close()
    return out


def rank_spec(data, run_dir, **parallel):
    # 96-token samples (longer than the tiny models' window); 2 ranks of 2 sequences, ZeRO-3
    # accumulating over micro-batches of 1; AdamW eps as in the equivalence tests
    return dict(model="sb7b-tiny", data=data, parallel=parallel,
                train=dict(max_steps=4, global_batch=4, lr=3e-3, warmup_steps=2, log_every=1, eval_every=2,
                           seed=7, device="cpu", eps=1e-6, run_dir=str(run_dir),
                           micro_batch=1 if parallel.get("zero_stage") == 3 or parallel.get("pp") else 0))


def test_same_val_loss_on_one_and_two_ranks(tmp_path):
    data = dict(seq_len=96, demo_chars=200_000, vocab_size=512, val_docs=VAL_DOCS,
                cache_dir=str(tmp_path / "cache"))
    [one] = worker([rank_spec(data, tmp_path / "one")])
    cases = {"dp2": dict(), "dp2-zero3": dict(zero_stage=3),
             "sp2": dict(sp=2, sp_linear="lasp2", sp_softmax="ulysses"), "pp2": dict(pp=2)}
    specs = [rank_spec(data, tmp_path / name, **p) for name, p in cases.items()]
    ranks = run_ranks(2, "tests.train.test_validate:worker", specs)
    assert [s for s, _, v in one if v is not None] == [2, 4]
    for name, rows in zip(cases, ranks[0]):
        assert [s for s, _, _ in rows] == [s for s, _, _ in one], name
        tol = 2e-5 if name == "pp2" else 1e-5  # the pipeline equivalence tests' tolerance
        assert [r[1] for r in rows] == pytest.approx([r[1] for r in one], rel=tol), name
        assert [r[2] for r in rows] == pytest.approx([r[2] for r in one], rel=tol), name
    assert ranks[1] == ranks[0]  # every rank computed the same values
