"""The all-to-all MoE dispatcher on ep = 2 and 4 gloo ranks equals one process running the full
sb76b-tiny MoE layer with LocalDispatcher on every rank's tokens: outputs and input gradients
per rank, router and shared-expert gradients summed over ranks, expert gradients as this rank's
slice, expert counts. Routing cases: random top-1 and top-2, skewed (an expert with no tokens, a
rank receiving nothing from some source or nothing at all), and every token to one expert.
A world of one is LocalDispatcher bit for bit. fp32 tolerance 1e-5.
"""
import copy

import pytest
import torch

from model.moe import LocalDispatcher
from parallel.expert import AllToAllDispatcher, shard_experts
from tests.parallel.expert_workers import CASES, build, exact_on_one, grads, tokens
from tests.parallel.ranks import launches

TOL = dict(rtol=1e-5, atol=1e-5)
WORLDS = (2, 4)


@pytest.fixture(scope="module")
def ranks():
    """ranks(world): every rank's results of tests.parallel.expert_workers:run (one launch per world)."""
    return launches("tests.parallel.expert_workers:run")


def reference(case: dict, world: int) -> dict:
    """The full layer on one process over all ranks' tokens, split back per rank."""
    moe = build(case)
    assert isinstance(moe.dispatcher, LocalDispatcher)
    xs, ws = zip(*(tokens(case, r) for r in range(world)))
    flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
    y, stats = moe(flat)
    (y * torch.cat([w.reshape(-1, w.shape[-1]) for w in ws])).sum().backward()
    ys = y.detach().split([x.shape[0] * x.shape[1] for x in xs])
    return {"y": [yr.view(x.shape) for yr, x in zip(ys, xs)], "x_grad": [x.grad for x in xs],
            "grads": grads(moe), "counts": stats.counts.long()}


@pytest.mark.parametrize("world,name", [(w, c["name"]) for w in WORLDS for c in CASES])
def test_all_to_all_equals_one_process(ranks, world, name):
    case = next(c for c in CASES if c["name"] == name)
    got, ref = [res[name] for res in ranks(world)], reference(case, world)
    local, total = 4 // world, sum(res["counts"] for res in got)
    torch.testing.assert_close(total, ref["counts"], rtol=0, atol=0)
    for r, res in enumerate(got):
        msg = lambda what: (lambda m: f"rank {r} {what}: {m}")  # noqa: E731
        torch.testing.assert_close(res["y"], ref["y"][r], **TOL, msg=msg("output"))
        torch.testing.assert_close(res["x_grad"], ref["x_grad"][r], **TOL, msg=msg("grad x"))
        for n, g in res["grads"].items():
            if n.startswith("experts."):
                torch.testing.assert_close(g, ref["grads"][n][r * local:(r + 1) * local], **TOL, msg=msg(n))
        torch.testing.assert_close(res["local_counts"], total[r * local:(r + 1) * local], rtol=0, atol=0)
    for n, g in ref["grads"].items():
        if not n.startswith("experts."):
            # a sum over ranks of per-rank gradients with cancellation (router.weight: entries up to
            # 39, some near 0.1): the summation order's error scales with the largest entry
            tol = dict(rtol=TOL["rtol"], atol=max(TOL["atol"], 1e-6 * float(g.abs().max())))
            torch.testing.assert_close(sum(res["grads"][n] for res in got), g, **tol, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("world", WORLDS)
def test_unbalanced_routing_is_what_it_claims(ranks, world):
    """The skewed and one-expert cases do starve experts and ranks (else they prove nothing)."""
    local = 4 // world
    skewed = [res["skewed-k1"] for res in ranks(world)]
    assert all(res["counts"][3] == 0 for res in skewed), "expert 3 should get no tokens"
    assert all(res["counts"][2] == 0 for res in skewed[1:]), "only rank 0 should route to expert 2"
    assert skewed[0]["counts"][2] > 0  # so expert 2's owner receives from rank 0 only
    assert skewed[3 // local]["local_counts"][3 % local] == 0, "expert 3's owner should receive none for it"
    if world == 4:
        assert skewed[3]["local_counts"].tolist() == [0], "rank 3 should receive nothing"
    one = [res["one-k1"] for res in ranks(world)]
    assert all(res["local_counts"].sum() == 0 for res in one[1:]), "ranks 1.. should receive nothing"


@pytest.mark.parametrize("world", WORLDS)
def test_group_of_one_is_local(ranks, world):
    assert all(res["one"] for res in ranks(world))


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_no_group_is_local(case):
    assert exact_on_one(case, None)


def test_no_group_keeps_counts():
    case = CASES[1]
    moe = copy.deepcopy(build(case))
    dispatcher = shard_experts(moe, None)
    assert isinstance(dispatcher, AllToAllDispatcher) and moe.experts.num_experts == 4
    x, _ = tokens(case, 0)
    moe(x)
    assert dispatcher.last_counts.tolist() == dispatcher.last_local_counts.tolist()
    assert int(dispatcher.last_counts.sum()) == x.shape[0] * x.shape[1] * case["top_k"]
    moe.experts.gate_proj = torch.nn.Parameter(moe.experts.gate_proj[:2].detach())
    with pytest.raises(ValueError, match="sharded already"):
        shard_experts(moe, None)


@pytest.mark.parametrize("world", WORLDS)
def test_experts_not_divisible_by_ep(ranks, world):
    for name, message in ranks(world)[0]["errors"].items():
        assert "parallel.ep" in message and "model.moe.num_experts" in message, f"{name}: {message}"
