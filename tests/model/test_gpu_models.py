"""On CUDA: every model family runs forward and backward under bf16 autocast and agrees with
the fp32 CPU model; full-width layers run at a realistic sequence length."""
import pytest
import torch

from model import build_model
from tests.helpers import model_config

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", ["qwen2.5-7b-tiny", "sb7b-tiny", "sb76b-tiny"])
def test_bf16_cuda_matches_fp32_cpu(name):
    torch.manual_seed(0)
    cpu = build_model(model_config(name))
    gpu = build_model(model_config(name), device="cuda", init=False)
    gpu.load_state_dict(cpu.state_dict())
    ids = torch.randint(0, cpu.cfg.vocab_size, (2, 300))
    pos = torch.cat([torch.arange(100), torch.arange(200)]).expand(2, -1)
    want = cpu(ids, position_ids=pos).logits
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = gpu(ids.cuda(), position_ids=pos.cuda(), labels=ids.cuda())
        got = gpu(ids.cuda(), position_ids=pos.cuda()).logits.float().cpu()
    out.loss_sum.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpu.parameters())
    assert (got - want).abs().max() < 0.1 * want.abs().max()


@pytest.mark.parametrize("name", ["sb7b", "sb76b"])
def test_full_width_layers_run_at_4k(name):
    """Two full-width layers (hidden 3584, 28/4 heads), 4096 tokens in two documents, bf16."""
    overrides = {"num_layers": 2}
    if name == "sb76b":
        overrides["moe"] = {"num_experts": 4, "top_k": 1, "num_shared": 1}
        overrides["layer_plan"] = {"mixer": ["gla+swa", "gla+full"], "ffn": ["dense", "moe"]}
    model = build_model(model_config(name, **overrides), device="cuda")
    ids = torch.randint(0, 152064, (1, 4096), device="cuda")
    pos = torch.cat([torch.arange(1500), torch.arange(2596)]).cuda()[None]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(ids, position_ids=pos, labels=ids)
    (out.loss_sum / out.num_tokens).backward()
    assert torch.isfinite(out.loss_sum)
