"""Issue 16's compositions on 8 gloo ranks (CPU), for when no 8-GPU host is lent: every parallel
axis composed, trained for three steps like one rank (losses rel 1e-5, parameters atol 5e-5, as
the pipeline and sequence-parallel tests).

- sb76b-tiny, dp 2 x pp 2 x ep 2 (ZeRO-1, micro-batches of 1, the balance loss per micro-batch);
- sb76b-tiny, ep 2 x sp 2 over 8 ranks (dp 4 of which ep 2; LASP-2 for GLA, Ulysses for softmax);
- sb7b-tiny, dp 2 x sp 4 with LASP-2 + Ulysses (2 KV heads over 4 ranks: padded, uneven heads) and
  with all-scan + halo.

Not in the default suite (8 processes on a 2-core machine take minutes): the marker
`eight_ranks` is deselected by setup.cfg; run
`python -m pytest -m eight_ranks tests/parallel/test_eight_ranks.py`.
"""
import pytest

from tests.parallel.ranks import run_ranks
from tests.parallel.test_equivalence import assert_same
from tests.parallel.test_pipeline import pp_spec
from tests.parallel.test_sequence import sp_spec
from tests.parallel.workers import merged, train

pytestmark = pytest.mark.eight_ranks


def cases(tmp, data):
    """name -> (8-rank spec, one-rank reference spec)."""
    out = {}
    for name, (pp, ep, sp) in {"sb76b-dp2-pp2-ep2": (2, 2, 1), "sb76b-ep2-sp2": (1, 2, 2)}.items():
        s = pp_spec(tmp, data, "sb76b-tiny", 8, pp, ep, 1, sp=sp, tag=name)
        s["parallel"].update(sp_linear="lasp2", sp_softmax="ulysses")
        s["train"].update(micro_batch=1)
        ref = pp_spec(tmp, data, "sb76b-tiny", tag=f"{name}-ref")
        ref["train"].update(micro_batch=1)  # the same micro-batches: the balance loss counts each
        out[name] = (s, ref)
    for linear, softmax in (("lasp2", "ulysses"), ("allscan", "halo")):
        s = sp_spec(tmp, data, "sb7b-tiny", 4, 2, linear, softmax)
        ref = pp_spec(tmp, data, "sb7b-tiny", tag=f"sp-{linear}-ref")
        out[f"sb7b-dp2-sp4-{linear}-{softmax}"] = (s, ref)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_data):
    tmp = tmp_path_factory.mktemp("eight")
    specs = cases(tmp, demo_data)
    results = run_ranks(8, "tests.parallel.workers:train_many", [s for s, _ in specs.values()], timeout=1800)
    # every rank's parameters: pipeline stages hold different ones
    return {name: (merged([r[i] for r in results]), train(ref)) for i, (name, (_, ref)) in enumerate(specs.items())}


@pytest.mark.parametrize("name", ["sb76b-dp2-pp2-ep2", "sb76b-ep2-sp2", "sb7b-dp2-sp4-lasp2-ulysses",
                                  "sb7b-dp2-sp4-allscan-halo"])
def test_eight_ranks_train_like_one(runs, name):
    result, reference = runs[name]
    assert result["step"] == 3
    assert_same(result, reference, atol=5e-5)
