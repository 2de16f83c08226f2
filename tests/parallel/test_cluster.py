"""The simulated cluster: gloo ranks grouped into virtual nodes (`parallel.ranks_per_node=2`),
so the two-level collectives run as they would across machines. sb76b-tiny on 8 ranks as
4 nodes (dp 2 x pp 2 x ep 2: each stage's ZeRO group spans 2 nodes) and on 4 ranks as 2 nodes
(ep 4 under ZeRO-3 with micro-batches of 2: the token all-to-all, the reduce-scatters and the
weight gathers all in two levels) gives the one-rank losses, updated parameters and expert load
after three steps; the same runs with `parallel.two_level=false` take the flat paths.

Tolerance: two-level against flat, parameters atol 1e-5 (another summation order only); against
one rank as the pipeline tests: losses rel 1e-5, parameters atol 2e-5.
"""
import pytest
import torch

from tests.parallel.ranks import run_ranks
from tests.parallel.test_equivalence import assert_same
from tests.parallel.test_pipeline import pp_spec
from tests.parallel.workers import merged, train

# name: (world, pp, ep, zero stage, micro-batch, the expected two-level use on the first rank)
CASES = {
    "8-ranks-4-nodes-dp2-pp2-ep2": (8, 2, 2, 1, 1, {"axes": ["shard"], "dispatchers": 0}),
    "4-ranks-2-nodes-ep4-zero3": (4, 1, 4, 3, 2, {"axes": ["ep", "shard"], "dispatchers": 2}),
}


def cluster_spec(tmp, data, name, two_level=True):
    world, pp, ep, stage, micro, *_ = CASES[name]
    s = pp_spec(tmp, data, "sb76b-tiny", world, pp, ep, stage, tag=f"{name}-{two_level}")
    s["parallel"].update(ranks_per_node=2, two_level=two_level)
    s["train"].update(micro_batch=micro)
    return s


@pytest.mark.parametrize("name", CASES)
def test_virtual_nodes_train_like_one_rank(name, tmp_path, demo_data):
    world, pp, ep, stage, micro, expected = CASES[name]
    one = pp_spec(tmp_path, demo_data, "sb76b-tiny", tag="ref")
    one["train"].update(micro_batch=micro)  # the balance loss counts each micro-batch: the same ones
    reference = train(one)
    results = run_ranks(world, "tests.parallel.workers:train_many",
                        [cluster_spec(tmp_path, demo_data, name), cluster_spec(tmp_path, demo_data, name, False)])
    two, flat = (merged([r[i] for r in results]) for i in range(2))
    assert two["two_level"]["axes"] == expected["axes"] and two["two_level"]["dispatchers"] == expected["dispatchers"]
    assert two["two_level"]["units"] >= 3  # the embeddings, every block, the root of the first stage
    assert flat["two_level"] == {"axes": [], "units": 0, "dispatchers": 0}
    for result in (two, flat):
        assert result["step"] == 3
        for n, p in reference["initial"].items():
            assert torch.equal(result["initial"][n], p), n
        assert_same(result, reference)
        assert result["expert_load"] == reference["expert_load"]
    assert_same(two, flat, atol=1e-5)
