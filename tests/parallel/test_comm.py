"""The collectives of parallel/comm.py on 2 and 4 gloo ranks equal their definitions computed on
one process from every rank's inputs, forward and backward (each rank's gradient is the slice of
the one-process gradient of sum over ranks of sum(out_r * weight_r)). Also: uneven all-to-all
with zero-size pieces, shifts by +-1, +-2, +3, the two linear_prefix methods with broadcast
decays containing zeros, p2p on a subgroup, identities in a world of one, argument errors.
fp32 tolerance 1e-6.
"""
import re

import pytest
import torch

from parallel import comm
from tests.parallel.comm_workers import cases, even, inputs, make, view, weight
from tests.parallel.ranks import launches

TOL = dict(rtol=1e-6, atol=1e-6)
WORLDS = (2, 4)


@pytest.fixture(scope="module")
def ranks():
    """ranks(world): every rank's results of tests.parallel.comm_workers:run (one launch per world)."""
    return launches("tests.parallel.comm_workers:run")


def definition(case: dict, t: list[dict], r: int, size: int) -> torch.Tensor:
    """Rank r's result from all ranks' op inputs t (the definitions of the spec)."""
    op = case["op"]
    if op == "all_gather":
        return torch.stack([ti["x"] for ti in t])
    if op == "reduce_scatter":
        return sum(ti["x"][r] for ti in t)
    if op == "all_to_all":
        splits = case["splits"] or [even(ti["x"].shape[0], size) for ti in t]
        return torch.cat([ti["x"].split(splits[i])[r] for i, ti in enumerate(t)])
    if op == "shift":
        src = r - case["offset"]
        return t[src]["x"] if 0 <= src < size else torch.zeros_like(t[r]["x"])
    h = torch.zeros(t[r]["s"].shape)  # closed form: sum_{j<r} (prod_{j<i<r} d_i) s_j
    for j in range(r):
        decay = torch.ones(t[r]["d"].shape)
        for i in range(j + 1, r):
            decay = decay * t[i]["d"]
        h = h + decay * t[j]["s"]
    return h


def reference(case: dict, size: int) -> tuple[list, list]:
    leaves = [inputs(case, r, size) for r in range(size)]
    t = [view(case, lv) for lv in leaves]
    outs = [definition(case, t, r, size) for r in range(size)]
    sum((o * weight(case, r, o.shape)).sum() for r, o in enumerate(outs)).backward()
    grads = [{k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in lv.items()} for lv in leaves]
    return [o.detach() for o in outs], grads


def assert_matches(case: dict, got: list[dict]) -> None:
    outs, grads = reference(case, len(got))
    for r, res in enumerate(got):
        assert res["intact"], f"rank {r} modified its input"
        assert res["out"].dtype == outs[r].dtype
        torch.testing.assert_close(res["out"], outs[r], **TOL, msg=lambda m: f"rank {r} output: {m}")
        for k, g in grads[r].items():
            torch.testing.assert_close(res["grads"][k], g, **TOL, msg=lambda m: f"rank {r} grad {k}: {m}")


@pytest.mark.parametrize("world,name", [(w, c["name"]) for w in WORLDS for c in cases(w)])
def test_collective_equals_definition(ranks, world, name):
    case = next(c for c in cases(world) if c["name"] == name)
    assert_matches(case, [res[name] for res in ranks(world)])


def test_subgroup_uses_group_ranks(ranks):
    """Global ranks [1, 3] as group ranks [0, 1]: results as on a world of two."""
    got = ranks(4)
    for case in cases(2):
        assert_matches(case, [got[1]["sub"][case["name"]], got[3]["sub"][case["name"]]])


@pytest.mark.parametrize("world", WORLDS)
def test_linear_prefix_methods_agree(ranks, world):
    for res in ranks(world):
        for d in ("2x3x4x1", "2x3x4x5", "5"):
            gather, ring = res[f"linear_prefix-gather-d{d}"], res[f"linear_prefix-ring-d{d}"]
            torch.testing.assert_close(gather["out"], ring["out"], **TOL)
            for k in ("s", "d"):
                torch.testing.assert_close(gather["grads"][k], ring["grads"][k], **TOL)


@pytest.mark.parametrize("world", WORLDS)
def test_send_recv(ranks, world):
    for r, res in enumerate(ranks(world)):
        torch.testing.assert_close(res["p2p"][0], make(7, r ^ 1, (3, 2)).detach().t(), rtol=0, atol=0)


@pytest.mark.parametrize("world", WORLDS)
def test_group_of_one(ranks, world):
    for r, res in enumerate(ranks(world)):
        x = make(3, r, (2, 3)).detach()
        assert torch.equal(res["one"]["all_gather"], x[None])
        assert torch.equal(res["one"]["shift"], torch.zeros(2, 3))
        assert torch.equal(res["one"]["linear_prefix"], torch.zeros(2, 3))


@pytest.mark.parametrize("world", WORLDS)
def test_bad_arguments_on_a_group(ranks, world):
    expected = {"splits-count": f"send_splits has {world + 1} entries; the group has {world} ranks",
                "splits-sum": r"sum to 3, but x.shape\[0\] = 4", "recv-count": "recv_splits has 1 entries",
                "negative": "send_splits must be >= 0", "offset": "offset must be a nonzero int, got 0",
                "reduce_scatter": f"needs x.shape\\[0\\] = {world}", "send-self": "must be another group rank"}
    for res in ranks(world):
        for name, pattern in expected.items():
            assert re.search(pattern, res["errors"][name]), (name, res["errors"][name])


def test_world_of_one_identities():
    x = torch.randn(4, 3, requires_grad=True)
    g = comm.all_gather(x.t())
    assert g.shape == (1, 3, 4) and torch.equal(g[0], x.t())
    g.sum().backward()
    assert torch.equal(x.grad, torch.ones(4, 3))
    assert torch.equal(comm.reduce_scatter(x[None]), x)
    assert comm.all_to_all(x) is x and comm.all_to_all(x, send_splits=[4], recv_splits=[4]) is x
    assert torch.equal(comm.shift(x, offset=-1), torch.zeros(4, 3))
    s, d = torch.randn(2, 3, 4, 5, dtype=torch.bfloat16), torch.rand(2, 3, 4, 1)
    for method in ("gather", "ring"):
        h = comm.linear_prefix(s, d, method=method)
        assert h.dtype == torch.float32 and torch.equal(h, torch.zeros(2, 3, 4, 5))
    assert torch.equal(comm.all_reduce(x), x)


@pytest.mark.parametrize("fn,message", [
    (lambda x: comm.all_to_all(x, send_splits=[3]), r"send_splits \[3\] sum to 3, but x.shape\[0\] = 4"),
    (lambda x: comm.all_to_all(x, send_splits=[2, 2]), "send_splits has 2 entries; the group has 1 ranks"),
    (lambda x: comm.all_to_all(x, recv_splits=[3]), "recv_splits .* must equal send_splits"),
    (lambda x: comm.all_to_all(x[0, 0]), "0-dim"),
    (lambda x: comm.reduce_scatter(x), r"needs x.shape\[0\] = 1"),
    (lambda x: comm.shift(x, offset=0), "offset must be a nonzero int, got 0"),
    (lambda x: comm.shift(x, offset=1.0), "offset must be a nonzero int"),
    (lambda x: comm.linear_prefix(x, x, method="scan"), "method must be 'gather' or 'ring', got 'scan'"),
    (lambda x: comm.linear_prefix(x, torch.ones(4, 3, 2)), r"d of shape \(4, 3, 2\) must broadcast to s"),
    (lambda x: comm.linear_prefix(x[:1], x), r"d of shape \(4, 3\) must broadcast to s of shape \(1, 3\)"),
    (lambda x: comm.send(x, 0), "a world of one"),
    (lambda x: comm.recv(x, 0), "a world of one"),
])
def test_bad_arguments(fn, message):
    with pytest.raises(ValueError, match=message):
        fn(torch.zeros(4, 3))
