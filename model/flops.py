"""Training FLOPs of a model: the one count behind the trainer's MFU and the benchmarks.

Convention: useful model FLOPs, the numerator of MFU. A multiply-add is 2 FLOPs and a backward
costs twice its forward, so one training pass is 3 x its forward.
- Matmuls: 6 x (active matmul weights) x tokens. The weights are those of every nn.Linear in the
  blocks plus the LM head (also when tied to the embedding: the head is a matmul, the embedding
  lookup is not); an MoE layer counts its router, its shared experts and top_k of its routed
  experts. Biases, norms, activations, RoPE, gates' elementwise math and the softmax itself
  are not counted (together well under 0.1% at these sizes).
- Softmax attention: q.k and p.v, 2 x head_dim FLOPs each per query head, for every visible
  (query, key) pair only: causal within a document, at most window + 1 keys with a window
  (query i sees i - window .. i), and S more keys per query with S sink tokens.
  Training: 3 x 4 x head_dim x query heads x pairs.
- GLA in the chunk form (chunks of GLA_CHUNK tokens, restarting at each document): the
  intra-chunk causal pairs per query head as in attention (2 K + 2 V per pair), the state read
  2 K V per token and query head, the state update 2 K V per token and KV head; x 3.
- Not counted: recomputation (activation checkpointing runs forwards again: cost, not model
  work), the sink tokens' own k/v projections (S rows per layer and forward pass, whatever the
  tokens), the MoE balance loss.

`lengths` is the list of document lengths of a batch, row after row; a row boundary is always a
document boundary, as in `SequenceContext`. `document_lengths` reads it from position_ids.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .decoder import Block
from .moe import Experts

GLA_CHUNK = 64


def document_lengths(position_ids: torch.Tensor) -> list[int]:
    """position_ids [B, T] (0 at each document start) -> document lengths, row after row (each
    row starts a document). Pass the batch's CPU tensor: a device tensor would be waited for."""
    b, t = position_ids.shape
    starts = position_ids == 0
    starts[:, 0] = True
    idx = torch.nonzero(starts.reshape(-1)).flatten()
    return torch.diff(idx, append=idx.new_tensor([b * t])).tolist()


def attention_pairs(lengths, window: int | None = None, sinks: int = 0) -> int:
    """Visible (query, key) pairs of causal attention over documents `lengths`, one head.
    window w: query i sees keys max(0, i - w) .. i; sinks: keys every query sees besides."""
    total = 0
    for n in lengths:
        if window is None or window >= n - 1:
            total += n * (n + 1) // 2
        else:  # the first window + 1 queries see 1 .. window + 1 keys, the rest window + 1
            total += (window + 1) * (window + 2) // 2 + (n - window - 1) * (window + 1)
        total += sinks * n
    return total


def gla_pairs(lengths, chunk: int = GLA_CHUNK) -> int:
    """Causal (query, key) pairs inside the chunks of each document (chunks restart at its start)."""
    total = 0
    for n in lengths:
        full, rest = divmod(n, chunk)
        total += full * chunk * (chunk + 1) // 2 + rest * (rest + 1) // 2
    return total


def attention_flops(lengths, num_heads: int, head_dim: int, window: int | None = None,
                    sinks: int = 0) -> int:
    """Training FLOPs of the attention core (q.k and p.v) over documents `lengths`."""
    return 3 * 4 * head_dim * num_heads * attention_pairs(lengths, window, sinks)


def gla_flops(lengths, num_heads: int, num_kv_heads: int, key_dim: int, value_dim: int,
              chunk: int = GLA_CHUNK) -> int:
    """Training FLOPs of the chunked GLA core over documents `lengths` (q [T, Hq, K],
    k [T, Hkv, K], v [T, Hkv, V]): intra-chunk pairs, state reads per query head, state
    updates per KV head (the state is shared by a KV group)."""
    tokens = sum(lengths)
    state = 2 * key_dim * value_dim
    intra = num_heads * 2 * (key_dim + value_dim) * gla_pairs(lengths, chunk)
    return 3 * (intra + tokens * state * (num_heads + num_kv_heads))


def matmul_weights(module: nn.Module, top_k: int) -> int:
    """Weights each token multiplies through in `module`: its nn.Linear weights, and top_k of the
    routed experts' weights of any MoE layer in it."""
    total = 0
    for m in module.modules():
        if isinstance(m, nn.Linear):
            total += m.in_features * m.out_features
        elif isinstance(m, Experts):
            total += top_k * sum(p[0].numel() for p in (m.gate_proj, m.up_proj, m.down_proj))
    return total


class ModelFlops:
    """Training FLOPs of one model config. The matmul weights of each kind of block (mixer, FFN)
    are counted once, on a block built on the meta device; a count then costs a loop over the
    documents and nothing on any device."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        kinds = {}
        for i, kind in enumerate(zip(cfg.mixers, cfg.ffns)):
            if kind not in kinds:
                with torch.device("meta"):
                    kinds[kind] = matmul_weights(Block(cfg, i), cfg.moe.top_k)
        self.block_weights = [kinds[kind] for kind in zip(cfg.mixers, cfg.ffns)]
        self.head_weights = cfg.vocab_size * cfg.hidden_size

    @property
    def active_matmul_weights(self) -> int:
        """The N of 6 x N x tokens: the blocks' active matmul weights plus the LM head."""
        return sum(self.block_weights) + self.head_weights

    def mixer_core(self, mixer: str, lengths) -> int:
        """Training FLOPs of the sequence-mixing core of a `mixer` layer (no projections)."""
        cfg, out = self.cfg, 0
        if mixer.startswith("gla"):
            out += gla_flops(lengths, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim)
        softmax = mixer.split("+")[-1]
        if softmax in ("full", "swa"):
            window = cfg.sliding_window if softmax == "swa" else None
            sinks = cfg.hybrid.num_sinks if "+" in mixer else 0
            out += attention_flops(lengths, cfg.num_heads, cfg.head_dim, window, sinks)
        return out

    def block(self, index: int, lengths) -> int:
        """Training FLOPs of block `index` over documents `lengths`."""
        return 6 * self.block_weights[index] * sum(lengths) + self.mixer_core(self.cfg.mixers[index], lengths)

    def step(self, lengths) -> int:
        """Training FLOPs of a forward and backward over documents `lengths` (the whole model)."""
        core = {m: self.mixer_core(m, lengths) for m in set(self.cfg.mixers)}
        return (6 * self.active_matmul_weights * sum(lengths)
                + sum(core[m] for m in self.cfg.mixers))

    def per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of sequences of `seq_len` tokens holding one document each."""
        return self.step([seq_len]) / seq_len


def step_flops(cfg: ModelConfig, lengths) -> int:
    """Training FLOPs of the model `cfg` over documents `lengths` (see `ModelFlops.step`)."""
    return ModelFlops(cfg).step(lengths)


def block_flops(cfg: ModelConfig, index: int, lengths) -> int:
    """Training FLOPs of block `index` of `cfg` over documents `lengths`."""
    return ModelFlops(cfg).block(index, lengths)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token at sequence length `seq_len`, one document per sequence."""
    return ModelFlops(cfg).per_token(seq_len)
