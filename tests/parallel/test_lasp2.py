"""GLA under sequence parallelism (`parallel.sequence.lasp2`) equals chunk_gla on the unsplit rows.

Rows are split into sp 2 and sp 4 slices with documents crossing the slice boundaries (1-token
documents at a boundary, a document over four slices, see `lasp2_workers.DOC_STARTS`). Checked
for the output and the gradients of q, k, v, g (fp32 reference backend on CPU; atol 1e-5,
rtol 1e-5: only the summation order differs), in one process with simulated ranks and on 2 and
4 gloo ranks with LASP-2 and the all-scan.
"""
import pytest
import torch

from ops.gla import chunk_gla
from parallel.sequence.lasp2 import add_incoming, local_pass, sp_linear_attention
from tests.parallel import lasp2_workers as cases
from tests.parallel.ranks import run_ranks

TOL = dict(atol=1e-5, rtol=1e-5)
SCALE = cases.DK ** -0.5


@pytest.fixture(scope="module", params=cases.DECAYS)
def full(request):
    """(inputs, reference): chunk_gla over the unsplit batch with its q, k, v, g gradients."""
    inputs = cases.make_inputs(request.param)
    leaves = {name: inputs[name].clone().requires_grad_() for name in "qkvg"}
    o, _ = chunk_gla(*leaves.values(), scale=SCALE, cu_seqlens=cases.global_cu_seqlens())
    o.backward(inputs["do"])
    return inputs, {"o": o.detach(), **{name: x.grad for name, x in leaves.items()}}


def assert_matches(per_rank: list[dict], reference: dict, sp: int) -> None:
    for name, want in reference.items():
        for rank, got in enumerate(per_rank):
            torch.testing.assert_close(got[name], cases.local_slice(want, rank, sp), **TOL,
                                       msg=lambda m: f"{name} on rank {rank} of {sp}: {m}")


def test_world_of_one_is_chunk_gla(full):
    inputs, _ = full
    cu = torch.tensor([0, 7, 30, 48, 96, 100, 144, 192], dtype=torch.int32)
    o = sp_linear_attention(inputs["q"], inputs["k"], inputs["v"], inputs["g"], scale=SCALE,
                            local_cu_seqlens=cu, continues=torch.zeros(4, dtype=torch.bool), group=None)
    want, _ = chunk_gla(inputs["q"], inputs["k"], inputs["v"], inputs["g"], scale=SCALE, cu_seqlens=cu)
    torch.testing.assert_close(o, want, **TOL)


@pytest.mark.parametrize("sp", [2, 4])
def test_simulated_ranks(full, sp):
    """All ranks in one autograd graph; the cross-rank chain h_{r+1} = d_r h_r + s_r by hand."""
    inputs, reference = full
    leaves = {name: inputs[name].clone().requires_grad_() for name in "qkvg"}
    parts, slices = [], []
    for rank in range(sp):
        x = {name: cases.local_slice(leaves[name], rank, sp) for name in "qkvg"}
        cu, continues = cases.local_layout(rank, sp)
        parts.append(local_pass(*x.values(), scale=SCALE, local_cu_seqlens=cu, continues=continues,
                                rows=len(cases.DOC_STARTS)))
        slices.append(x)
    h = torch.zeros_like(parts[0].s)
    outs = []
    for part, x in zip(parts, slices):
        outs.append(add_incoming(part, x["q"], x["g"], h, scale=SCALE))
        h = part.d * h + part.s
    o = torch.stack([out.reshape(len(cases.DOC_STARTS), -1, *out.shape[2:]) for out in outs], dim=1)
    o = o.reshape(reference["o"].shape)
    o.backward(inputs["do"])
    torch.testing.assert_close(o.detach(), reference["o"], **TOL)
    for name in "qkvg":
        torch.testing.assert_close(leaves[name].grad, reference[name], **TOL, msg=lambda m: f"d{name}: {m}")


@pytest.fixture(scope="module", params=[2, 4])
def gloo_runs(request):
    return request.param, run_ranks(request.param, "tests.parallel.lasp2_workers:sp_ranks")


@pytest.mark.parametrize("method", cases.METHODS)
def test_gloo_ranks(gloo_runs, full, method, request):
    sp, results = gloo_runs
    decay = request.node.callspec.params["full"]
    assert_matches([r[(method, decay)] for r in results], full[1], sp)


def _call(**overrides):
    x = torch.zeros(1, 8, 2, 4)
    kwargs = dict(q=x, k=x, v=x, g=x, scale=0.5, local_cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32),
                  continues=torch.zeros(2, dtype=torch.bool), method="lasp2")
    kwargs.update(overrides)
    q, k, v, g = (kwargs.pop(n) for n in "qkvg")
    return sp_linear_attention(q, k, v, g, **kwargs)


@pytest.mark.parametrize("overrides, match", [
    (dict(method="ring"), "parallel.sp_linear must be lasp2 or allscan"),
    (dict(q=torch.zeros(2, 4, 2, 4)), "q must be"),
    (dict(v=torch.zeros(1, 6, 2, 4)), "share the token count"),
    (dict(continues=torch.zeros(3, dtype=torch.bool)), "do not split"),
    (dict(continues=torch.zeros(2, dtype=torch.int64)), "continues must be"),
    (dict(local_cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32)), "row start"),
    (dict(local_cu_seqlens=torch.tensor([0, 4, 7], dtype=torch.int32)), "rise from 0"),
])
def test_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        _call(**overrides)
