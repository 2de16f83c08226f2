"""Selective recomputation's policy: what it keeps, and what it must not count."""
import importlib.util

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from parallel.recompute import _SAVED_OPS, _selective_contexts


def test_profiler_annotations_do_not_shift_the_replay():
    """FSDP2 units nested in a block (the experts under expert parallelism) annotate their hooks a
    different number of times in the forward and in the recomputation. Selective recomputation
    replays saved ops by their order per op, so counted annotations would break the backward."""
    calls = {"n": 0}
    w = torch.randn(8, 8, requires_grad=True)

    def block(x):
        calls["n"] += 1
        for _ in range(calls["n"]):  # the forward annotates once, the recomputation twice
            with torch.profiler.record_function("hook"):
                pass
        return torch.tanh(x @ w) @ w

    x = torch.randn(4, 8, requires_grad=True)
    checkpoint(block, x, use_reentrant=False, context_fn=_selective_contexts).sum().backward()
    assert calls["n"] == 2  # it was recomputed
    got = (x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    block(x).sum().backward()
    torch.testing.assert_close(got, (x.grad, w.grad), rtol=0, atol=0)


@pytest.mark.skipif(importlib.util.find_spec("torch.nn.attention.varlen") is None, reason="no varlen_attn")
def test_flash_varlen_attention_is_kept():
    """On CUDA, windowed and packed attention run torch's varlen_attn custom op: its output is
    kept like every other attention core's, not recomputed."""
    assert torch.ops.torch_attn._varlen_attn.default in _SAVED_OPS
