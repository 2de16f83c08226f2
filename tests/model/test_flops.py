"""Training FLOP counts (`model.flops`): hand-checked tiny configs, the textbook formula for
Qwen2.5-7B, packed documents and windows, document lengths from position_ids."""
import pytest
import torch

from model import build_model
from model.config import ModelConfig
from model.flops import (ModelFlops, attention_pairs, block_flops, document_lengths, flops_per_token,
                         gla_flops, gla_pairs, step_flops)
from tests.helpers import model_config
from train.config import from_dict


def tiny(mixers, ffns=("dense",), **kw):
    """hidden 8, 2 query heads / 1 KV head of dim 4, FFN 16, vocab 32, window 3."""
    return from_dict(ModelConfig, dict(vocab_size=32, hidden_size=8, num_layers=len(mixers), num_heads=2,
                                       num_kv_heads=1, intermediate_size=16, sliding_window=3,
                                       layer_plan={"mixer": list(mixers), "ffn": list(ffns)}, **kw))


def test_hand_checked_full_and_window_layers():
    cfg = tiny(["full", "swa"])
    lengths = [5, 2]
    # per layer: q 8x8 + k 8x4 + v 8x4 + o 8x8 = 192, FFN 3 x 8 x 16 = 384; head 8 x 32 = 256
    assert ModelFlops(cfg).active_matmul_weights == 2 * 576 + 256
    matmuls = 6 * (2 * 576 + 256) * 7
    # full: 5*6/2 + 2*3/2 = 18 pairs; window 3: keys per query 1,2,3,4,4 and 1,2 = 17 pairs;
    # per pair and query head 2 matmuls x 2 x head_dim 4 = 16 FLOPs forward, x 3, 2 query heads
    full, window = 3 * 16 * 2 * 18, 3 * 16 * 2 * 17
    assert step_flops(cfg, lengths) == matmuls + full + window == 62496
    assert block_flops(cfg, 0, lengths) == 6 * 576 * 7 + full
    assert block_flops(cfg, 1, lengths) == 6 * 576 * 7 + window


def test_hand_checked_gla():
    # one document of 70: chunk pairs 64*65/2 + 6*7/2 = 2101; K = V = 4, 2 query heads, 1 KV head
    assert gla_pairs([70]) == 2101
    intra = 2 * (2 * 4 + 2 * 4) * 2101
    state_reads, state_updates = 2 * 16 * 70 * 2, 2 * 16 * 70 * 1
    assert gla_flops([70], 2, 1, 4, 4) == 3 * (intra + state_reads + state_updates) == 221856
    cfg = tiny(["gla"], gla={"gate_rank": 2})
    gate = 8 * 2 + 2 * 4  # low-rank gate 8 -> 2 -> kv_dim 4
    assert block_flops(cfg, 0, [70]) == 6 * (576 + gate) * 70 + 221856
    assert gla_pairs([64, 128]) == 3 * 2080  # chunks restart at each document


def test_moe_counts_router_shared_and_top_k_experts():
    cfg = tiny(["full"], ffns=["moe"], moe={"num_experts": 4, "top_k": 2, "num_shared": 1, "expert_size": 6})
    # router 8 x 4; two routed experts of 3 x 8 x 6; one shared expert of 3 x 8 x 6
    weights = 192 + 8 * 4 + 2 * 144 + 144
    assert block_flops(cfg, 0, [1]) == 6 * weights + 3 * 16 * 2 * 1
    total = build_model(cfg, device="meta").num_params()
    assert total["total"] - total["active"] == 2 * 144  # the two experts a token skips


def test_sinks_and_hybrid_layers():
    assert attention_pairs([5], window=3, sinks=2) == 17 - 3 + 2 * 5
    cfg = tiny(["gla+swa"], hybrid={"num_sinks": 2, "shared_qkvo": True}, gla={"gate_rank": 2})
    core = gla_flops([5], 2, 1, 4, 4) + 3 * 16 * 2 * attention_pairs([5], 3, 2)
    assert block_flops(cfg, 0, [5]) == 6 * (576 + 24) * 5 + core
    separate = tiny(["gla+full"], hybrid={"num_sinks": 0, "shared_qkvo": False}, gla={"gate_rank": 2})
    core = gla_flops([5], 2, 1, 4, 4) + 3 * 16 * 2 * 15
    assert block_flops(separate, 0, [5]) == 6 * (576 + 192 + 24) * 5 + core


def test_tied_head_is_still_counted():
    untied, tied = tiny(["full"]), tiny(["full"], tie_word_embeddings=True)
    assert step_flops(tied, [9]) == step_flops(untied, [9])


def test_qwen2_5_7b_matches_the_textbook_formula():
    """6 N T (N: parameters without the embedding, biases and norms included) plus causal
    attention: per layer 2 matmuls of 2 T^2 H D forward, halved by the mask, x 3."""
    cfg = model_config("qwen2.5-7b")
    t = 8192
    n = build_model(cfg, device="meta").num_params()["total"] - cfg.vocab_size * cfg.hidden_size
    textbook = 6 * n * t + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * t ** 2 / 2
    assert step_flops(cfg, [t]) == pytest.approx(textbook, rel=1e-2)
    assert flops_per_token(cfg, t) == pytest.approx(textbook / t, rel=1e-2)


def test_packed_documents_count_fewer_attention_flops():
    cfg = model_config("qwen2.5-7b")
    one, packed = step_flops(cfg, [8192]), step_flops(cfg, [1024] * 8)
    attention_saved = 3 * 4 * cfg.head_dim * cfg.num_heads * cfg.num_layers * (
        attention_pairs([8192]) - attention_pairs([1024] * 8))
    assert packed < one and one - packed == attention_saved


def test_windows_cap_attention_flops():
    for n in (10, 4096, 4097, 100_000):
        assert attention_pairs([n], 4096) <= n * 4097
    assert attention_pairs([4097], 4096) == attention_pairs([4097])  # the window spans it all
    assert attention_pairs([100_000], 4096) < attention_pairs([100_000]) / 12
    # sliding-window models stay nearly flat per token from 32k to 128k; full attention does not
    sb7b, qwen = model_config("sb7b"), model_config("qwen2.5-7b")
    assert flops_per_token(sb7b, 131072) / flops_per_token(sb7b, 32768) < 1.01
    assert flops_per_token(qwen, 131072) / flops_per_token(qwen, 32768) > 1.5


def test_document_lengths_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [3, 4, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]])
    assert document_lengths(pos) == [3, 2, 1, 2, 4, 6]
    lengths = document_lengths(pos)
    assert step_flops(tiny(["full"]), lengths) < step_flops(tiny(["full"]), [6, 6, 6])
