"""ZeRO 0-3 on 2 and 4 gloo ranks equal one rank: the same tiny model and global batch give the
same losses for three steps and the same updated parameters, with and without gradient
accumulation and recomputation; the sharded meta-device init equals the one-rank init.

Sequences (96 tokens) are longer than the tiny models' window (64), so sliding-window attention
is active. Tolerance (fp32): losses rel 1e-5; parameters atol 2e-5 after three AdamW steps at
lr 3e-3 (measured differences are about 2e-6: only the reduction order differs).
"""
import pytest
import torch

from tests.parallel.ranks import run_ranks
from tests.parallel.workers import train

MODELS = ["sb7b-tiny", "sb76b-tiny", "qwen2.5-7b-tiny"]
# (zero_stage, micro_batch, recompute); global batch 8: 4 sequences per rank on 2 ranks, 2 on 4
CASES = {
    2: [(0, 0, "none"), (0, 2, "selective"), (1, 2, "full"), (2, 0, "selective"), (2, 2, "none"),
        (3, 0, "full"), (3, 2, "selective")],
    4: [(0, 1, "full"), (1, 1, "selective"), (2, 1, "none"), (3, 1, "full")],
}
ONE_RANK = [(0, 2, "full"), (0, 4, "selective")]  # accumulation and recomputation alone


# AdamW's eps: a weight whose gradient is near zero (|g| << 1e-8 would be needed to make the
# update small) moves by about lr whatever the sign of its rounding noise, so one such element can
# differ by up to lr from one rank. eps 1e-6, still far below the typical gradient, keeps such
# updates linear in the gradient; a wrong gradient still shows.
EPS = 1e-6


def spec(tmp, data, model, stage=-1, micro_batch=0, recompute="none", tag="ref"):
    return dict(model=model, data=data, parallel=dict(zero_stage=stage),
                train=dict(max_steps=3, global_batch=8, micro_batch=micro_batch, recompute=recompute, lr=3e-3,
                           warmup_steps=2, log_every=1, seed=7, device="cpu", run_dir=str(tmp / f"{model}-{tag}"),
                           eps=EPS))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, demo_data):
    tmp, data = tmp_path_factory.mktemp("equivalence"), demo_data
    reference = {m: train(spec(tmp, data, m)) for m in MODELS}  # also fills the data cache
    return tmp, data, reference


@pytest.fixture(scope="module")
def runs(setup):
    tmp, data, _ = setup
    out = {}
    for world, cases in CASES.items():
        keys = [(m, case) for m in MODELS for case in cases]
        specs = [spec(tmp, data, m, *case, tag=f"w{world}-{'-'.join(map(str, case))}") for m, case in keys]
        out.update({(world, *key): r for key, r in zip(keys, run_ranks(world, "tests.parallel.workers:train_many", specs)[0])})
    for m in MODELS:
        for case in ONE_RANK:
            out[(1, m, case)] = train(spec(tmp, data, m, *case, tag=f"w1-{'-'.join(map(str, case))}"))
    return out


def assert_same(result, ref, atol: float = 2e-5):
    assert result["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    assert result["params"].keys() == ref["params"].keys()
    for name, p in ref["params"].items():
        torch.testing.assert_close(result["params"][name], p, rtol=0, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("world,case", [(w, c) for w, cases in CASES.items() for c in cases] +
                         [(1, c) for c in ONE_RANK])
def test_same_losses_and_updates_as_one_rank(setup, runs, model, world, case):
    result, ref = runs[(world, model, case)], setup[2][model]
    assert result["stage"] == case[0] and result["step"] == 3
    for name, p in ref["initial"].items():  # meta build + sharded init == one-rank init, exactly
        assert torch.equal(result["initial"][name], p), name
    assert_same(result, ref)


def test_the_comparison_can_fail(setup, runs):
    """A different global batch order (seed) is far outside the tolerance."""
    tmp, data, reference = setup
    other = spec(tmp, data, "sb7b-tiny", tag="seed")
    other["train"]["seed"] = 8
    with pytest.raises(AssertionError):
        assert_same(train(other), reference["sb7b-tiny"])


def test_compiled_regions_under_zero3_match_one_eager_rank(setup):
    """train.compile=regions (inductor, also on the CPU) under ZeRO-3 with recomputation on 2
    ranks gives the one-rank eager run's losses and updates: FSDP2's gathered weights reach the
    compiled regions as inputs, and recomputation re-runs them."""
    tmp, data, reference = setup
    model = "sb76b-tiny"  # MoE (its shared expert is a compiled SwiGLU) + hybrid with sinks
    s = spec(tmp, data, model, 3, 0, "full", tag="w2-compiled")
    s["train"]["compile"] = "regions"
    result = run_ranks(2, "tests.parallel.workers:train_many", [s])[0][0]
    assert result["stage"] == 3 and result["step"] == 3
    assert result["compiled"] > 0 and reference[model]["compiled"] == 0  # auto is none on the CPU
    assert_same(result, reference[model])
