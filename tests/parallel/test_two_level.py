"""Two-level collectives (`parallel.comm.Route`, `reduce_scatter_two_level`,
`all_gather_two_level`, the expert dispatcher with levels) against the flat ones on gloo worlds
laid over virtual nodes: 8 ranks as 4 nodes of 2, 4 ranks as 2 nodes of 2. All-to-alls (uneven,
zero-size pieces, a rank sending nothing; both directions and their gradients) match exactly;
reductions within 1e-6 (another summation order). Also the node layouts the mesh finds and the
ranks_per_node errors."""
import pytest

from parallel.config import ParallelConfig
from parallel.mesh import node_size
from tests.parallel.ranks import run_ranks

CASES = {  # world, ranks per node, ep -> the (nodes, ranks per node) of each axis's group
    "8x2-ep4": (8, 2, 4, {"shard": (4, 2), "ep": (2, 2), "expert_shard": None}),
    "4x2-ep4": (4, 2, 4, {"shard": (2, 2), "ep": (2, 2), "expert_shard": None}),
    "4x2-ep2": (4, 2, 2, {"shard": (2, 2), "ep": None, "expert_shard": None}),
}


@pytest.mark.parametrize("name", CASES)
def test_two_level_equals_flat(name):
    world, per_node, ep, layout = CASES[name]
    results = run_ranks(world, "tests.parallel.two_level_workers:run", {"ranks_per_node": per_node, "ep": ep})
    for rank, res in enumerate(results):
        assert res["layout"] == layout, (rank, res["layout"])
        assert (res["ranks_per_node"], res["nodes"]) == (per_node, world // per_node)
        checks = {k: v for k, v in res.items() if k not in ("layout", "ranks_per_node", "nodes")}
        assert len(checks) >= (10 if layout["ep"] is None else 28), sorted(checks)
        exact = {k: v for k, v in checks.items() if "reduce_scatter" not in k}
        assert all(v == 0 for v in exact.values()), (rank, {k: v for k, v in exact.items() if v})
        close = {k: v for k, v in checks.items() if "reduce_scatter" in k}
        assert all(v <= 1e-6 for v in close.values()), (rank, close)


def test_ranks_per_node_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"parallel.ranks_per_node=3 does not divide the world size 8"):
        node_size(ParallelConfig(ranks_per_node=3), 8)
    with pytest.raises(ValueError, match=r"parallel.ranks_per_node must be >= 0"):
        ParallelConfig(ranks_per_node=-1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert node_size(ParallelConfig(), 8) == 4  # torchrun's --nproc-per-node
    assert node_size(ParallelConfig(ranks_per_node=2), 8) == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert node_size(ParallelConfig(), 8) == 8
