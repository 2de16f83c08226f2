"""Sharded checkpoints across layouts: a checkpoint written by 2 ranks with ZeRO-3 resumes on one
rank, and one written by one rank resumes on 4 ranks with ZeRO-2, with the losses of an
uninterrupted one-rank run; `train.init_from` reads only each rank's rows."""
import os
import shutil

import pytest
import torch

from model.hf.checkpoint import HFCheckpoint
from tests.parallel.ranks import run_ranks
from tests.parallel.workers import train

MODEL = "sb76b-tiny"  # MoE + hybrid: every kind of parameter and optimizer state


def spec(tmp, data, tag, stage=-1, stop_after=None, **train_overrides):
    t = dict(max_steps=6, global_batch=8, lr=3e-3, warmup_steps=2, log_every=1, seed=7, device="cpu",
             save_every=3, keep_checkpoints=0, run_dir=str(tmp / tag))
    t.update(train_overrides)
    return dict(model=MODEL, data=data, parallel=dict(zero_stage=stage), train=t, stop_after=stop_after)


@pytest.fixture(scope="module")
def whole(tmp_path_factory, demo_data):
    """Six uninterrupted steps on one rank (checkpoints at steps 3 and 6)."""
    tmp, data = tmp_path_factory.mktemp("sharded"), demo_data
    return tmp, data, train(spec(tmp, data, "whole"))


def test_two_ranks_zero3_resume_on_one_rank(whole):
    tmp, data, ref = whole
    first = run_ranks(2, "tests.parallel.workers:train", spec(tmp, data, "a", stage=3, stop_after=3))[0]
    assert first["step"] == 3 and first["stage"] == 3
    assert first["losses"] == pytest.approx(ref["losses"][:3], rel=1e-5)
    shards = os.listdir(tmp / "a" / "checkpoints" / "step_00000003" / "shards")
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(shards)  # each rank wrote its part
    rest = train(spec(tmp, data, "a"))  # one rank, resumes automatically from the 2-rank checkpoint
    assert rest["steps"] == [4, 5, 6]
    assert rest["losses"] == pytest.approx(ref["losses"][3:], rel=1e-5)
    for name, p in ref["params"].items():
        torch.testing.assert_close(rest["params"][name], p, rtol=0, atol=2e-5, msg=name)


def test_one_rank_checkpoint_resumes_on_four_ranks_zero2(whole):
    tmp, data, ref = whole
    step3 = tmp / "whole" / "checkpoints" / "step_00000003"
    rest = run_ranks(4, "tests.parallel.workers:train", spec(tmp, data, "b", stage=2, resume=str(step3)))[0]
    assert rest["steps"] == [4, 5, 6] and rest["stage"] == 2
    assert rest["losses"] == pytest.approx(ref["losses"][3:], rel=1e-5)
    for name, p in ref["params"].items():
        torch.testing.assert_close(rest["params"][name], p, rtol=0, atol=2e-5, msg=name)


def test_init_from_reads_only_each_ranks_rows(whole, tmp_path):
    """Every rank asks the checkpoint reader for its own rows only; together they cover each
    tensor exactly once, and the sharded model equals the converted weights."""
    tmp, data, ref = whole
    from model.convert import save_hf_checkpoint
    from tests.helpers import model_config

    src = str(tmp_path / "hf")
    save_hf_checkpoint(ref["params"], model_config(MODEL), src, dtype=torch.float32)
    payload = spec(tmp, data, "c", stage=3, max_steps=1, init_from=src, save_every=0)
    results = run_ranks(2, "tests.parallel.test_sharded_checkpoints:counted_init_from", payload)
    total = sum(p.numel() for p in ref["params"].values())
    read = [r["elements"] for r in results]
    assert sum(read) == total and all(0.4 * total < n < 0.6 * total for n in read)
    for name in ref["params"]:
        spans = sorted(span for r in results for span in r["rows"][name])
        assert spans[0][0] == 0 and spans[-1][1] == ref["params"][name].shape[0], name
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), name  # disjoint, no gaps
    for name, p in ref["params"].items():
        assert torch.equal(results[0]["initial"][name], p), name


def counted_init_from(payload: dict) -> dict:
    """(In a rank.) Builds with train.init_from while counting what the reader is asked for."""
    from tests.parallel.workers import full_params, make_config
    from parallel import Mesh
    from train import build

    asked = {"elements": 0, "rows": {}}
    original = HFCheckpoint.rows

    def counting(self, name, start, stop):
        t = original(self, name, start, stop)
        asked["elements"] += t.numel()
        ours = name.removeprefix("model.")
        asked["rows"].setdefault(ours, []).append((start, stop))
        return t

    HFCheckpoint.rows = counting
    try:
        cfg = make_config(payload)
        mesh = Mesh(cfg.parallel, "cpu")
        trainer = build(cfg, mesh)
    finally:
        HFCheckpoint.rows = original
    trainer.loader.close()
    return {**asked, "initial": full_params(trainer.model, mesh.is_main)}


def test_sequence_parallel_run_resumes_on_one_rank_and_back(whole):
    """sp 2 stops at step 3; one rank resumes to step 6 (the checkpoint reshards from the dp x sp
    shards); the same checkpoint also resumes on sp 2 x dp 2. Both end on the uninterrupted
    one-rank run."""
    tmp, data, ref = whole
    sp = dict(sp=2, zero_stage=2)
    first_spec = spec(tmp, data, "sp", stop_after=3)
    first_spec["parallel"].update(sp)
    first = run_ranks(2, "tests.parallel.workers:train", first_spec)[0]
    assert first["step"] == 3 and first["losses"] == pytest.approx(ref["losses"][:3], rel=1e-5)
    shutil.copytree(tmp / "sp", tmp / "sp-copy")
    rest = train(spec(tmp, data, "sp"))
    assert rest["steps"] == [4, 5, 6] and rest["losses"] == pytest.approx(ref["losses"][3:], rel=1e-5)
    wide_spec = spec(tmp, data, "sp-copy")
    wide_spec["parallel"].update(sp)
    wide = run_ranks(4, "tests.parallel.workers:train", wide_spec)[0]
    assert wide["steps"] == [4, 5, 6] and wide["losses"] == pytest.approx(ref["losses"][3:], rel=1e-5)
    for result in (rest, wide):
        for name, p in ref["params"].items():
            torch.testing.assert_close(result["params"][name], p, rtol=0, atol=2e-5, msg=name)
