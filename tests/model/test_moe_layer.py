"""The MoE layer: local dispatch equals a per-token loop; balance loss; router weighting."""
import torch
import torch.nn.functional as F

from tests.helpers import model_config
from model.moe import MoE, load_balance_loss


def swiglu(x, wg, wu, wd):
    return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


def test_moe_equals_per_token_loop():
    cfg = model_config("sb76b-tiny", moe={"num_experts": 4, "top_k": 2, "num_shared": 1})
    torch.manual_seed(0)
    moe = MoE(cfg)
    moe.init_weights()
    x = torch.randn(3, 7, cfg.hidden_size)
    y, stats = moe(x)
    flat = x.reshape(-1, cfg.hidden_size)
    probs = F.softmax(moe.router(flat), dim=-1)
    e = moe.experts
    expected = []
    for n in range(flat.shape[0]):
        w, idx = probs[n].topk(2)
        out = moe.shared(flat[n])
        for j in range(2):
            i = int(idx[j])
            out = out + w[j] * swiglu(flat[n], e.gate_proj[i], e.up_proj[i], e.down_proj[i])
        expected.append(out)
    torch.testing.assert_close(y.reshape(-1, cfg.hidden_size), torch.stack(expected), atol=1e-5, rtol=1e-5)
    aux = stats.balance_loss()
    assert aux.ndim == 0 and aux > 0
    assert stats.tokens == 21 and stats.counts.sum() == 21 * 2


def test_balance_loss_is_one_when_balanced_and_larger_when_not():
    probs = torch.full((8, 4), 0.25)
    idx = torch.arange(8).remainder(4)[:, None]
    assert torch.isclose(load_balance_loss(probs, idx), torch.tensor(1.0))
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(8, 1)
    assert load_balance_loss(skewed, torch.zeros(8, 1, dtype=torch.long)) > 2.5
