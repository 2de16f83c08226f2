"""Pipeline parallelism through the trainer (1F1B, torch.distributed.pipelining): sb7b-tiny and
sb76b-tiny on pp 2 and 4 gloo ranks, pp 2 x dp 2, pp 2 x ep 2 and pp 2 under ZeRO-3 give the
one-rank losses, updated parameters and expert load on the same global batch and micro-batches;
a checkpoint written on pp 2 resumes on one rank and on pp 4; stages are balanced by cost.

Every run: 8 sequences of 96 tokens per step in micro-batches of 2, three AdamW steps at lr 3e-3,
fp32; the MoE balance loss per micro-batch (model.moe.balance=micro, the pipeline's mode).
Tolerance as the data-parallel tests: losses rel 1e-5, parameters atol 2e-5 (AdamW eps 1e-6, see
tests/parallel/test_equivalence.py: with eps 1e-8, one element of layers.0.attn.v_proj, whose
gradient is near zero, differed from one rank by up to 1e-4 depending on the CPU).
"""
import os

import pytest
import torch
import yaml

from parallel.pipeline import check_pipeline, cut_stages, stage_costs
from tests.helpers import ROOT, model_config
from tests.parallel.ranks import error_messages, run_ranks
from tests.parallel.test_equivalence import assert_same as same, spec
from tests.parallel.workers import merged, train

# (model, world, pp, ep, zero stage, sp)
CASES = [
    ("sb7b-tiny", 2, 2, 1, -1, 1),
    ("sb7b-tiny", 4, 4, 1, -1, 1),
    ("sb76b-tiny", 2, 2, 1, -1, 1),
    ("sb76b-tiny", 4, 4, 1, -1, 1),
    ("sb76b-tiny", 4, 2, 1, -1, 1),   # pp 2 x dp 2
    ("sb76b-tiny", 4, 2, 2, -1, 1),   # pp 2 x ep 2 (dp 2 = ep)
    ("sb76b-tiny", 4, 2, 1, 3, 1),    # pp 2 x dp 2, ZeRO-3
    ("sb76b-tiny", 4, 2, 1, -1, 2),   # pp 2 x sp 2: each stage's slices of the sequences
]


def case_id(c) -> str:
    model, world, pp, ep, stage, sp = c
    return f"{model}-w{world}-pp{pp}-ep{ep}-z{stage}-sp{sp}"


def pp_spec(tmp, data, model, world=1, pp=1, ep=1, stage=-1, sp=1, tag=None):
    s = spec(tmp, data, model, stage, 2, "none", tag=tag or case_id((model, world, pp, ep, stage, sp)))
    s["parallel"].update(pp=pp, ep=ep, sp=sp)
    if model == "sb76b-tiny":
        with open(os.path.join(ROOT, "conf", "model", "sb76b-tiny.yaml")) as f:
            moe = yaml.safe_load(f)["moe"]
        s["model_overrides"] = {"moe": {**moe, "balance": "micro"}}
    return s


def assert_same(result, ref):
    same(result, ref, atol=2e-5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_data):
    tmp = tmp_path_factory.mktemp("pipeline")
    reference = {m: train(pp_spec(tmp, demo_data, m, tag="ref")) for m in {c[0] for c in CASES}}
    out = {}
    for world in sorted({c[1] for c in CASES}):
        cases = [c for c in CASES if c[1] == world]
        results = run_ranks(world, "tests.parallel.workers:train_many", [pp_spec(tmp, demo_data, *c) for c in cases])
        for i, c in enumerate(cases):
            out[c] = merged([r[i] for r in results]) | {"rank_param_bytes": [r[i]["local_param_bytes"] for r in results]}
    return reference, out


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_same_losses_and_updates_as_one_rank(runs, case):
    reference, out = runs
    result, ref = out[case], reference[case[0]]
    assert result["step"] == 3
    for name, p in ref["initial"].items():  # every stage's parts: the one-rank init, exactly
        assert torch.equal(result["initial"][name], p), name
    assert_same(result, ref)
    assert result["expert_load"] == ref["expert_load"]  # all stages' MoE layers, the global batch


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_planned_stage_state_equals_the_real_shards(runs, case, tmp_path, demo_data):
    """The planner's fp32 weights per rank, stage by stage, are the real shards of each stage's
    first rank (its blocks, the embeddings on the first, the norm and head on the last)."""
    from parallel.plan import plan_memory
    from tests.parallel.workers import make_config

    model, world, pp, ep, stage, sp = case
    plan = plan_memory(make_config(pp_spec(tmp_path, demo_data, *case)), world // (pp * sp), "cpu")
    real = runs[1][case]["rank_param_bytes"]
    assert [st["params"] for st in plan.stages] == [real[k * (world // pp)] for k in range(pp)]


def test_resume_on_other_layouts(tmp_path, demo_data):
    """Stopped after step 2 on pp 2, the run continues on one rank and on pp 4 with the
    uninterrupted one-rank run's step-3 loss and weights: checkpoints use the decoder's names."""
    whole = train(pp_spec(tmp_path / "whole", demo_data, "sb76b-tiny", tag="whole"))
    for name, pp in {"one": 1, "pp4": 4}.items():
        s = pp_spec(tmp_path / name, demo_data, "sb76b-tiny", 2, 2, tag="run")
        run_ranks(2, "tests.parallel.workers:train", {**s, "stop_after": 2})
        resumed = dict(s, parallel={**s["parallel"], "pp": pp})
        r = train(resumed) if pp == 1 else merged(run_ranks(pp, "tests.parallel.workers:train", resumed))
        assert r["steps"] == [3], name
        assert_same({"losses": r["losses"], "params": r["params"]},
                    {"losses": whole["losses"][2:], "params": whole["params"]})


def test_stages_balance_counted_cost():
    """sb76b at 8k on 4 stages: contiguous, every block once, and no stage costs more than the
    best contiguous cut (found here by trying every cut); the LM head and loss count on the last."""
    cfg = model_config("sb76b")
    blocks, head = stage_costs(cfg, 8192)
    bounds = cut_stages(cfg, 8192, 4)
    assert [i for r in bounds for i in r] == list(range(cfg.num_layers)) and all(len(r) for r in bounds)
    cost = lambda rs: max(sum(blocks[i] for i in r) + head * (k == len(rs) - 1) for k, r in enumerate(rs))  # noqa: E731
    n = cfg.num_layers
    best = min(cost([range(0, a), range(a, b), range(b, c), range(c, n)])
               for a in range(1, n) for b in range(a + 1, n) for c in range(b + 1, n))
    assert cost(bounds) == pytest.approx(best)
    assert len(bounds[-1]) < len(bounds[0])  # the head's 6 x 152k x 3584 FLOPs per token take room


def test_misconfigurations_are_named(tmp_path, demo_data):
    from tests.parallel.workers import make_config

    def message(model, pp, micro_batches, **overrides):
        cfg = make_config(pp_spec(tmp_path, demo_data, model))
        if overrides:
            cfg.model = model_config(model, **overrides)
        try:
            check_pipeline(cfg, pp, micro_batches)
        except ValueError as e:
            return str(e)
        return "no error"

    assert "at least 8 decoder layers" in message("sb7b-tiny", 8, 8)
    assert "at least 4 micro-batches" in message("sb7b-tiny", 4, 2)
    assert "model.tie_word_embeddings=true" in message("sb7b-tiny", 2, 2, tie_word_embeddings=True)
    assert "set model.moe.balance=micro" in message("sb76b-tiny", 2, 2, moe={"num_experts": 4, "balance": "global"})
    assert message("sb76b-tiny", 2, 2, moe={"num_experts": 4, "balance": "micro"}) == "no error"
    # through the launch path: 2 micro-batches per step cannot fill 4 stages
    s = pp_spec(tmp_path, demo_data, "sb7b-tiny", 4, 4, tag="short")
    s["train"].update(micro_batch=4)
    errors = run_ranks(4, "tests.parallel.test_pipeline:build_error", s)[0]
    assert "parallel.pp=4 needs at least 4 micro-batches per step" in errors["build"]


def build_error(s) -> dict:
    from parallel import Mesh
    from train import build
    from tests.parallel.workers import make_config

    def attempt():
        cfg = make_config(s)
        build(cfg, Mesh(cfg.parallel, "cpu"))

    return error_messages([("build", attempt)])


@pytest.mark.parametrize("preset, world, seq", [("sb76b-8k", 32, 8192), ("sb76b-32k", 128, 32768),
                                                ("sb76b-128k", 256, 131072)])
def test_sb76b_presets_are_the_reports_layout(monkeypatch, preset, world, seq):
    """conf/parallel/sb76b-*: 4 stages, ep 8, sp 1 / 4 / 8, ZeRO-1; on their smallest world the
    layout holds and full sb76b cuts into 4 stages (with its balance per micro-batch)."""
    import sys

    from parallel.mesh import check_layout

    monkeypatch.syspath_prepend(os.path.join(ROOT, "launch"))
    from pretrain import load_config

    cfg = load_config(["+model=sb76b", f"parallel={preset}", "model.moe.balance=micro", f"data.seq_len={seq}",
                       "train.micro_batch=1", "train.global_batch=32"])  # 4 micro-batches per dp rank
    p = cfg.parallel
    assert (p.pp, p.ep, p.sp, p.zero_stage) == (4, 8, cfg_sp(preset), 1)
    dp = check_layout(p, world)
    assert dp == 8 and "pretrain" in sys.modules
    check_pipeline(cfg, p.pp, cfg.train.global_batch // dp)
    bounds = cut_stages(cfg.model, seq, p.pp)
    assert len(bounds) == 4 and bounds[-1].stop == cfg.model.num_layers


def cfg_sp(preset: str) -> int:
    return {"sb76b-8k": 1, "sb76b-32k": 4, "sb76b-128k": 8}[preset]
