"""Expert parallelism through the trainer: sb76b-tiny on ep 2 and 4 gloo ranks, with expert-data
parallelism (dp 4 = 2 replicas x ep 2), with sequence parallelism, with experts split along their
rows (6 experts: 3 per EP rank over 2 ranks holding them), under ZeRO 2 and 3 with accumulation
and recomputation, gives the one-rank losses and updated parameters; checkpoints written with ep 2
resume on one rank and on ep 4.

Tolerance (fp32) as the data-parallel equivalence tests: losses rel 1e-5, parameters atol 2e-5
after three AdamW steps at lr 3e-3.
"""
import os

import pytest
import yaml

from tests.helpers import ROOT

from tests.parallel.ranks import error_messages, run_ranks
from tests.parallel.test_equivalence import assert_same, spec
from tests.parallel.workers import train

# (world, ep, sp, zero stage, model overrides, train overrides)
CASES = [
    (2, 2, 1, -1, (), ()),
    (4, 4, 1, -1, (), ()),
    (4, 2, 1, -1, (), ()),                       # 2 expert-data-parallel replicas of each expert
    (4, 2, 2, -1, (), ()),                       # ep 2 x sp 2: experts sharded over the SP ranks
    (4, 2, 1, -1, (("num_experts", 6),), ()),    # 3 local experts over 2 ranks: rows split
    (2, 2, 1, 2, (), (("micro_batch", 2), ("recompute", "selective"))),
    (4, 2, 1, 3, (("num_experts", 6),), (("micro_batch", 2), ("recompute", "full"))),
]


def case_id(c) -> str:
    world, ep, sp, stage, model, train_ = c
    return f"w{world}-ep{ep}-sp{sp}-z{stage}" + "".join(f"-{k}{v}" for k, v in model + train_)


def ep_spec(tmp, data, world, ep, sp, stage, model=(), train_=()):
    s = spec(tmp, data, "sb76b-tiny", stage, 0, "none", tag=case_id((world, ep, sp, stage, model, train_)))
    s["parallel"].update(ep=ep, sp=sp)
    s["train"].update(dict(train_))
    if model:
        with open(os.path.join(ROOT, "conf", "model", "sb76b-tiny.yaml")) as f:
            moe = yaml.safe_load(f)["moe"]
        s["model_overrides"] = {"moe": {**moe, **dict(model)}}
    return s


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_data):
    tmp = tmp_path_factory.mktemp("expert")
    models = sorted({c[4] for c in CASES})
    reference = {m: train(ep_spec(tmp, demo_data, 1, 1, 1, -1, m)) for m in models}
    out = {}
    for world in sorted({c[0] for c in CASES}):
        cases = [c for c in CASES if c[0] == world]
        results = run_ranks(world, "tests.parallel.workers:train_many", [ep_spec(tmp, demo_data, *c) for c in cases])[0]
        out.update(zip(cases, results))
    return reference, out


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_same_losses_and_updates_as_one_rank(runs, case):
    reference, out = runs
    result, ref = out[case], reference[case[4]]
    assert result["step"] == 3 and result["stage"] >= 1
    for name, p in ref["initial"].items():  # meta build + expert sharding + init == one-rank init
        assert (result["initial"][name] == p).all(), name
    assert_same(result, ref)
    # the logged expert load counts the whole global batch, whichever rank routed a token
    assert result["expert_load"] == ref["expert_load"] and len(ref["expert_load"][0]) == 2  # 2 MoE layers
    assert all(sum(layer) == pytest.approx(1, abs=1e-4) for row in ref["expert_load"] for layer in row)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_planned_state_equals_the_real_shards(runs, case, tmp_path, demo_data):
    """The planner's fp32 weights and AdamW moments per rank are the first rank's real shards:
    E / ep experts per MoE layer, split by experts or (6 experts: 3 over 2 ranks) by rows."""
    from parallel.plan import plan_memory
    from tests.parallel.workers import make_config

    world, ep, sp = case[:3]
    plan = plan_memory(make_config(ep_spec(tmp_path, demo_data, *case)), world // sp, "cpu")
    assert plan.ep == ep and plan.params == runs[1][case]["local_param_bytes"]
    assert plan.optimizer == 2 * plan.params


def test_resume_on_other_layouts(tmp_path, demo_data):
    """A run stopped after step 2 on ep 2 continues on one rank and on ep 4 (4 ranks) with the
    uninterrupted run's step-3 loss and weights: checkpoints hold whole expert tensors."""
    whole = train(ep_spec(tmp_path / "whole", demo_data, 1, 1, 1, -1))
    runs = {}
    for name, (world, ep) in {"one": (1, 1), "ep4": (4, 4)}.items():
        s = ep_spec(tmp_path / name, demo_data, 2, 2, 1, -1)
        run_ranks(2, "tests.parallel.workers:train", {**s, "stop_after": 2})
        resumed = dict(s, parallel={**s["parallel"], "ep": ep})
        runs[name] = train(resumed) if world == 1 else run_ranks(world, "tests.parallel.workers:train", resumed)[0]
    for name, r in runs.items():
        assert r["steps"] == [3], name
        assert r["losses"][0] == pytest.approx(whole["losses"][2], rel=1e-5), name
        assert_same({"losses": whole["losses"][2:], "params": r["params"]},
                    {"losses": whole["losses"][2:], "params": whole["params"]})


def test_misconfigurations_are_named(tmp_path, demo_data):
    from parallel.config import ParallelConfig
    from parallel.mesh import check_layout

    with pytest.raises(ValueError, match="parallel.ep=2 needs ZeRO stage 1, 2 or 3"):
        ParallelConfig(ep=2, zero_stage=0)
    with pytest.raises(ValueError, match="parallel.ep=4 must divide the data-parallel size 2"):
        check_layout(ParallelConfig(ep=4, sp=2), 4)
    errors = run_ranks(2, "tests.parallel.test_expert_training:build_errors",
                       [ep_spec(tmp_path, demo_data, 2, 2, 1, -1, (("num_experts", 3),)),
                        dict(spec(tmp_path, demo_data, "sb7b-tiny", tag="dense"), parallel={"ep": 2})])[0]
    assert "model.moe.num_experts = 3 is not divisible by parallel.ep = 2" in errors["odd experts"]
    assert "model sb7b-tiny has no MoE layer" in errors["dense model"]


def build_errors(specs) -> dict:
    from parallel import Mesh
    from train import build
    from tests.parallel.workers import make_config

    def attempt(s):
        cfg = make_config(s)
        build(cfg, Mesh(cfg.parallel, "cpu"))

    return error_messages([("odd experts", lambda: attempt(specs[0])), ("dense model", lambda: attempt(specs[1]))])
