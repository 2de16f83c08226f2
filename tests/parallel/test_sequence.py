"""Sequence parallelism through the trainer: the same tiny model and global batch on sp 2 and 4
gloo ranks (and dp 2 x sp 2) give the one-rank losses and updated parameters.

Samples are 96 tokens of packed demo documents, so at sp 4 a rank holds 24 tokens: documents cross
slice boundaries, and the 64-token window spans three slices (the halo comes from three ranks).
Tolerance (fp32): losses rel 1e-5, parameters atol 5e-5 after three AdamW steps at lr 3e-3 (the
data-parallel tests allow 2e-5; sp 4 with all-gathered GLA states and the halo measured 2.2e-5 on
one element of 16,384 in layers.2.attn.q_proj: AdamW's normalisation of a near-zero gradient).
"""
import pytest
import torch

from model.context import SequenceContext
from parallel.sequence import ShardedSequenceContext
from tests.parallel.ranks import run_ranks
from tests.parallel.test_equivalence import assert_same, spec
from tests.parallel.workers import train

# (model, sp, dp, sp_linear, sp_softmax); dp x sp ranks
CASES = [
    ("sb7b-tiny", 2, 1, "lasp2", "ulysses"),
    ("sb7b-tiny", 2, 1, "allscan", "halo"),
    ("sb7b-tiny", 4, 1, "lasp2", "halo"),
    ("sb7b-tiny", 4, 1, "allscan", "ulysses"),
    ("sb7b-tiny", 2, 2, "lasp2", "auto"),
    ("sb76b-tiny", 2, 1, "lasp2", "ulysses"),
    ("sb76b-tiny", 4, 1, "allscan", "halo"),
    ("sb76b-tiny", 2, 2, "allscan", "auto"),
    # gradient accumulation (the balance loss counted over the step) and recomputation
    ("sb76b-tiny", 2, 1, "lasp2", "auto", (("micro_batch", 2), ("recompute", "selective"))),
    ("sb7b-tiny", 2, 1, "allscan", "halo", (("micro_batch", 4), ("recompute", "full"))),
]


def sp_spec(tmp, data, model, sp, dp, linear, softmax, train=()):
    s = spec(tmp, data, model, -1, 0, "none", tag=f"sp{sp}-dp{dp}-{linear}-{softmax}-{len(train)}")
    s["parallel"].update(sp=sp, sp_linear=linear, sp_softmax=softmax)
    s["train"].update(dict(train))
    return s


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_data):
    tmp = tmp_path_factory.mktemp("sequence")
    reference = {m: train(spec(tmp, demo_data, m)) for m in {c[0] for c in CASES}}
    out = {}
    for world in sorted({sp * dp for _, sp, dp, *_ in CASES}):
        cases = [c for c in CASES if c[1] * c[2] == world]
        results = run_ranks(world, "tests.parallel.workers:train_many", [sp_spec(tmp, demo_data, *c) for c in cases])[0]
        out.update(zip(cases, results))
    return reference, out


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:5])) + ("-accumulate" if c[5:] else ""))
def test_same_losses_and_updates_as_one_rank(runs, case):
    reference, out = runs
    result = out[case]
    assert result["step"] == 3 and result["stage"] >= 1  # SP ranks shard the state they share
    assert_same(result, reference[case[0]], atol=5e-5)


def test_slices_keep_documents_whole():
    """A document crossing a slice boundary continues there (positions go on, no boundary in the
    global offsets); row starts are local boundaries; continues says which rows carry state in."""
    pos = torch.cat([torch.arange(5), torch.arange(1), torch.arange(6)]).unsqueeze(0)  # docs 5, 1, 6
    pos = torch.cat([pos, torch.arange(12).unsqueeze(0)])  # row 1: one document
    whole = SequenceContext.from_position_ids(pos)
    ctxs = [ShardedSequenceContext.slice(pos, r, 3) for r in range(3)]  # slices of 4 tokens
    for c in ctxs:
        assert torch.equal(c.global_cu_seqlens, whole.cu_seqlens)
        assert c.rows == 2 and c.slice_len == 4 and c.packed
    assert [c.continues.tolist() for c in ctxs] == [[False, False], [True, True], [True, True]]
    assert ctxs[1].position_ids.tolist() == [[4, 0, 0, 1], [4, 5, 6, 7]]
    assert ctxs[1].local_cu_seqlens.tolist() == [0, 1, 2, 4, 8]  # doc end, 1-token doc, new doc; row 1
    assert torch.equal(torch.cat([c.slice_tokens(pos) for c in ctxs], dim=1), pos)


def test_misconfigurations_are_named():
    from parallel.config import ParallelConfig

    with pytest.raises(ValueError, match="not divisible by parallel.sp=5"):
        ShardedSequenceContext.slice(torch.arange(12).unsqueeze(0), 0, 5)
    with pytest.raises(ValueError, match="parallel.sp=2 needs ZeRO stage 1, 2 or 3"):
        ParallelConfig(sp=2, zero_stage=0)
    with pytest.raises(ValueError, match="parallel.sp_linear must be lasp2 or allscan"):
        ParallelConfig(sp=2, sp_linear="ring")
    with pytest.raises(ValueError, match="parallel.sp_softmax must be auto, ulysses or halo"):
        ParallelConfig(sp=2, sp_softmax="ring")
    from data.config import DataConfig
    from parallel.sequence import check_sequence_parallel
    from tests.helpers import model_config
    from train.config import RunConfig

    def run(model, seq_len, sp, **dims):
        return RunConfig(model=model_config(model, **dims), parallel=ParallelConfig(sp=sp),
                         data=DataConfig(seq_len=seq_len))

    with pytest.raises(ValueError, match="data.seq_len=96 must be divisible by parallel.sp=5"):
        check_sequence_parallel(run("sb7b-tiny", 96, 5))
    with pytest.raises(ValueError, match="parallel.sp=2"):  # 6 query / 3 KV heads cannot spread over 2
        check_sequence_parallel(run("sb7b-tiny", 96, 2, num_heads=6, num_kv_heads=3, head_dim=32))
    check_sequence_parallel(run("sb7b-tiny", 96, 4))  # 4 query / 2 KV heads: KV replicated x2


def test_plan_of_a_slice():
    """Under SP a rank plans its slice of every row, with the state sharded over dp x sp."""
    import dataclasses

    from data.config import DataConfig
    from parallel import plan as P
    from parallel.config import ParallelConfig
    from tests.helpers import model_config
    from train.config import RunConfig, TrainConfig

    def plan(seq_len, dp, sp):
        cfg = RunConfig(model=model_config("sb7b-tiny"), parallel=ParallelConfig(sp=sp), data=DataConfig(seq_len=seq_len),
                        train=TrainConfig(global_batch=2 * dp))
        return P.plan_memory(cfg, dp, "cpu")

    split, sharded, short = plan(192, 2, 2), plan(192, 4, 1), plan(96, 2, 1)
    assert split.sp == 2 and split.seq_len == 192 and split.tokens_per_micro_batch == 2 * 96
    assert (split.params, split.optimizer, split.zero_stage) == (sharded.params, sharded.optimizer, sharded.zero_stage)
    assert split.activations == short.activations and split.logits == short.logits
    with pytest.raises(ValueError, match="data.seq_len=190 must be divisible by parallel.sp=4"):
        plan(190, 1, 4)


def test_traffic_counts():
    from data.config import DataConfig
    from parallel.config import ParallelConfig
    from parallel.sequence import volume as V
    from tests.helpers import model_config
    from train.config import RunConfig

    m = model_config("sb7b-tiny")  # gla, swa, gla, swa; 2 KV heads of 32
    state, decay = 2 * 2 * 32 * 32, 2 * 2 * 32
    assert V.gla_volume(rows=2, kv_heads=2, head_dim=32, sp=4, method="lasp2") == 3 * (state + decay) * 4
    assert V.gla_volume(rows=2, kv_heads=2, head_dim=32, sp=4, method="allscan") == state * 4
    assert V.gla_volume(rows=2, kv_heads=2, head_dim=32, sp=1, method="lasp2") == 0
    cfg = RunConfig(model=m, parallel=ParallelConfig(sp=4, sp_softmax="halo"), data=DataConfig(seq_len=96))
    vol = V.step_volume(cfg, micro_batch=2, micro_batches=3, element_size=4)
    assert [(mixer, how) for mixer, how, _ in vol["per_layer"]] == [("gla", "lasp2"), ("swa", "halo")] * 2
    # halo: the 64-token window from 3 earlier ranks of 24 tokens, K and V, both directions
    assert vol["per_layer"][1][2] == 2 * 2 * 64 * 2 * 2 * 32 * 4
    assert vol["step"] == 3 * sum(n for *_, n in vol["per_layer"])
    assert "per step" in V.format_volume(vol)
