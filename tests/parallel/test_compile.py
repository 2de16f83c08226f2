"""Regional compilation (`train.compile=regions`, parallel/compile.py).

On the CPU the regions compile with AOT autograd and no code generation ("aot_eager": the same
graphs, forward and backward, that inductor would fuse), so the suite needs no C compiler: losses
and every gradient must match eager, with and without recomputation and spiking, and a new
document layout must not recompile. On CUDA (marked gpu) inductor fuses them for real.
"""
import dataclasses

import pytest
import torch

from model import build_model
from parallel import compile as C
from parallel.recompute import apply_recompute
from tests.helpers import model_config
from train.config import TrainConfig

MODELS = ["sb7b-tiny", "sb76b-tiny", "qwen2.5-7b-tiny"]
B, T = 2, 96


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given and runs them through AOT
    autograd (so backward graphs are made and checked too)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.common import aot_autograd
        from functorch.compile import make_boxed_func

        self.graphs += 1
        return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward))(gm, example_inputs)


@pytest.fixture(autouse=True)
def _fresh_dynamo():  # tests switch backends and shapes freely
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _batch(cfg, seed=0, lengths=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    if lengths is None:
        pos = torch.arange(T).expand(B, T)
    else:  # packed documents of these lengths in every row
        pos = torch.cat([torch.arange(n) for n in lengths]).expand(B, T)
    return ids, pos


def _step(model, ids, pos):
    out = model(ids, position_ids=pos, labels=ids)
    loss = out.loss_sum / out.num_tokens + out.aux_loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _pair(name, recompute="none", **cfg_overrides):
    cfg = model_config(name, **cfg_overrides)
    torch.manual_seed(0)
    eager = build_model(cfg)
    compiled = build_model(cfg, init=False)
    compiled.load_state_dict(eager.state_dict())
    if cfg.spike.enabled:  # spiking's thresholds live outside the state dict
        compiled.load_state_dict(eager.state_dict())
    backend = CountingBackend()
    marked = C.apply_compile(compiled, "regions", backend=backend)
    for m in (eager, compiled):
        apply_recompute(m.layers, recompute)
    return cfg, eager, compiled, backend, marked


@pytest.mark.parametrize("name, recompute", [(m, "none") for m in MODELS]
                         + [("sb76b-tiny", "full"), ("sb7b-tiny", "selective")])
def test_regions_match_eager(name, recompute):
    cfg, eager, compiled, backend, marked = _pair(name, recompute)
    assert marked == C.compiled_regions(compiled) > 0
    assert C.compiled_regions(eager) == 0
    ids, pos = _batch(cfg, lengths=[40, 1, 55])
    loss_e, grads_e = _step(eager, ids, pos)
    loss_c, grads_c = _step(compiled, ids, pos)
    assert backend.graphs > 0
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
    assert grads_c.keys() == grads_e.keys()
    for n in grads_e:
        torch.testing.assert_close(grads_c[n], grads_e[n], rtol=1e-5, atol=1e-6, msg=n)
    # the state dict (and so every checkpoint) has the same names
    assert list(compiled.state_dict()) == list(eager.state_dict())


def test_new_document_layout_does_not_recompile():
    cfg, _, compiled, backend, _ = _pair("sb76b-tiny")
    for seed, lengths in enumerate([[40, 1, 55], [10, 20, 30, 36], [95, 1], [1] * 96]):
        ids, pos = _batch(cfg, seed, lengths)
        _step(compiled, ids, pos)
        if seed == 0:
            first = backend.graphs
    assert backend.graphs == first  # boundaries live in the context, which no region sees


def test_spiking_regions_match_eager():
    cfg = model_config("sb7b-tiny")
    cfg = dataclasses.replace(cfg, spike=dataclasses.replace(cfg.spike, enabled=True))
    torch.manual_seed(0)
    eager = build_model(cfg)
    torch.manual_seed(0)
    compiled = build_model(cfg)
    C.apply_compile(compiled, "regions", backend=CountingBackend())
    ids, pos = _batch(cfg)
    loss_e, grads_e = _step(eager, ids, pos)
    loss_c, grads_c = _step(compiled, ids, pos)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
    for n in grads_e:
        torch.testing.assert_close(grads_c[n], grads_e[n], rtol=1e-5, atol=1e-6, msg=n)


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="train.compile must be one of auto, none, regions"):
        TrainConfig(compile="blocks")
    with pytest.raises(ValueError, match="train.compile"):
        C.apply_compile(build_model(model_config("sb7b-tiny"), device="meta"), "all")
    assert C.resolve("auto", torch.device("cuda")) == "regions"
    assert C.resolve("auto", torch.device("cpu")) == "none"
    assert C.resolve("regions", torch.device("cpu")) == "regions"


def test_meta_model_is_marked_and_compiles_at_first_call():
    model = build_model(model_config("qwen2.5-7b-tiny"), device="meta")
    assert C.apply_compile(model, "regions", backend=CountingBackend()) == C.compiled_regions(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", MODELS)
def test_inductor_regions_on_cuda(name):
    """bf16 autocast, inductor: the compiled model is as close to the fp32 model as eager bf16 is
    (fusion keeps fp32 inside a region where eager rounds between ops, so it may be closer)."""
    cfg = model_config(name)
    torch.manual_seed(0)
    eager = build_model(cfg, device="cuda")
    compiled = build_model(cfg, device="cuda", init=False)
    compiled.load_state_dict(eager.state_dict())
    C.apply_compile(compiled, "regions")
    ids, pos = (t.cuda() for t in _batch(cfg, lengths=[40, 1, 55]))
    loss_ref, grads_ref = _step(eager, ids, pos)  # fp32
    eager.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_e, grads_e = _step(eager, ids, pos)
        loss_c, grads_c = _step(compiled, ids, pos)
    assert C.compiled_regions(compiled) > 0
    assert abs(loss_c - loss_ref) <= 2 * abs(loss_e - loss_ref) + 1e-3 * abs(loss_ref), (loss_c, loss_e, loss_ref)
    total_e = torch.cat([(grads_e[n] - grads_ref[n]).flatten() for n in grads_ref]).norm()
    total_c = torch.cat([(grads_c[n] - grads_ref[n]).flatten() for n in grads_ref]).norm()
    scale = torch.cat([g.flatten() for g in grads_ref.values()]).norm()
    assert total_c <= 2 * total_e + 1e-3 * scale, (total_c.item(), total_e.item(), scale.item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["sb7b-tiny", "sb76b-tiny"])
def test_spiking_inductor_regions_on_cuda(name):
    """Spiking with inductor regions on CUDA (the fused Triton spike kernel, counting its firing
    statistics as training does): it compiles and gives the eager model's loss and gradients.
    The spike call is one torch.library operator inside the regions (no graph break)."""
    from model.spiking import spike_sites

    cfg = model_config(name)
    cfg = dataclasses.replace(cfg, spike=dataclasses.replace(cfg.spike, enabled=True))
    torch.manual_seed(0)
    eager = build_model(cfg, device="cuda")
    compiled = build_model(cfg, device="cuda", init=False)
    compiled.load_state_dict(eager.state_dict())
    C.apply_compile(compiled, "regions")
    for site in spike_sites(compiled):  # as the trainer's firing counters do
        site.stats = torch.zeros(3, dtype=torch.int64, device="cuda")
    ids, pos = (t.cuda() for t in _batch(cfg, lengths=[40, 1, 55]))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_e, grads_e = _step(eager, ids, pos)
        loss_c, grads_c = _step(compiled, ids, pos)
    assert C.compiled_regions(compiled) > 0
    assert abs(loss_c - loss_e) <= 1e-2 * abs(loss_e), (loss_c, loss_e)
    assert all(torch.isfinite(g).all() for g in grads_c.values())
    assert all(int(site.stats[0]) > 0 for site in spike_sites(compiled))  # every site counted
