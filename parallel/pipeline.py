"""Pipeline parallelism: the decoder's blocks cut into `parallel.pp` stages, run by the 1F1B
schedule of `torch.distributed.pipelining`.

- Stages are contiguous runs of blocks, balanced by their counted training FLOPs
  (`model.flops`: matmuls and the attention or GLA core at `data.seq_len`). The first stage also
  holds the embeddings, the last the final norm, the LM head and the loss, whose FLOPs count
  there. `cut_stages` minimises the most expensive stage.
- A rank's `Stage` holds its part of the decoder under the decoder's own parameter names
  ("layers.5.mixer..."), so checkpoints do not depend on the layout: a run resumes on any pp.
- Between stages travel the hidden states as [1, B*T, hidden] (the packed layout; a micro-batch
  of one document per row runs as [B, T, hidden] inside the stages) and the MoE balance loss summed so far ([1], fp32). The last stage adds it
  to its loss, so the balance gradient reaches every stage's routers. The sequence context and
  the labels of each micro-batch do not travel: the trainer hands every stage the host-built
  contexts of the step (`Stage.begin_step`), and the schedule passes each stage the micro-batch
  index.
- The loss is the summed token loss times `scale` (the trainer's global normalisation), so the
  schedule must not rescale the gradients (`scale_grads=False`).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from model.decoder import Decoder
from model.flops import ModelFlops


def check_pipeline(cfg, pp: int, micro_batches: int) -> None:
    """ValueError naming the setting at fault for a pipeline of `pp` stages over `micro_batches`
    micro-batches per optimizer step. cfg: RunConfig."""
    m = cfg.model
    if pp == 1:
        return
    if m.num_layers < pp:
        raise ValueError(f"parallel.pp={pp} stages need at least {pp} decoder layers; model {m.name} has "
                         f"model.num_layers={m.num_layers}")
    if micro_batches < pp:
        raise ValueError(f"parallel.pp={pp} needs at least {pp} micro-batches per step to fill the pipeline; "
                         f"this run has {micro_batches} (train.global_batch / dp / train.micro_batch): lower "
                         f"train.micro_batch or raise train.global_batch")
    if m.tie_word_embeddings:
        raise ValueError(f"parallel.pp={pp}: model {m.name} ties its LM head to the embeddings "
                         f"(model.tie_word_embeddings=true), which would live on different stages")
    if "moe" in m.ffns and m.moe.balance == "global":
        raise ValueError(f"parallel.pp={pp}: model.moe.balance=global counts the expert load of the whole step "
                         f"before the first backward, but the pipeline runs backwards while later "
                         f"micro-batches are still in the forward; set model.moe.balance=micro (each "
                         f"micro-batch's load, over all its data- and sequence-parallel ranks)")


def stage_costs(cfg, seq_len: int) -> tuple[list[float], float]:
    """(training FLOPs of each block, of the head and loss) for sequences of `seq_len` tokens.
    cfg: ModelConfig."""
    flops = ModelFlops(cfg)
    blocks = [float(flops.block(i, [seq_len])) for i in range(cfg.num_layers)]
    return blocks, float(6 * flops.head_weights * seq_len)


def cut_stages(cfg, seq_len: int, pp: int) -> list[range]:
    """The blocks of each of `pp` stages (contiguous, at least one each), minimising the largest
    stage cost; the head and loss count on the last stage. cfg: ModelConfig."""
    blocks, head = stage_costs(cfg, seq_len)
    n = len(blocks)
    prefix = [0.0]
    for c in blocks:
        prefix.append(prefix[-1] + c)
    cost = lambda i, j, last: prefix[j] - prefix[i] + (head if last else 0.0)  # noqa: E731
    # best[s][j]: the least max cost of cutting blocks [0, j) into s stages; cut[s][j] its last start
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(pp + 1)]
    cut = [[0] * (n + 1) for _ in range(pp + 1)]
    best[0][0] = 0.0
    for s in range(1, pp + 1):
        for j in range(s, n + 1):
            for i in range(s - 1, j):
                value = max(best[s - 1][i], cost(i, j, s == pp and j == n))
                if value < best[s][j]:
                    best[s][j], cut[s][j] = value, i
    bounds, j = [], n
    for s in range(pp, 0, -1):
        i = cut[s][j]
        bounds.append(range(i, j))
        j = i
    return bounds[::-1]


class Stage(nn.Module):
    """One pipeline stage of a Decoder: blocks `layers`, plus the embeddings on the first stage
    and the final norm and LM head on the last, under the decoder's parameter names.

    forward(*activations, micro): the first stage takes input_ids [B, T]; the others take (hidden
    [1, B*T, hidden], balance loss so far [1]). Returns the same pair for the next stage, or on
    the last stage the micro-batch's loss [1]: summed token loss x scale + balance loss.
    `begin_step` gives the stage the step's contexts, labels, scale and balance-loss function;
    `loss_sums` collects the last stage's summed token loss of each micro-batch (detached).
    """

    def __init__(self, decoder: Decoder, layers: range, first: bool, last: bool, act_dtype: torch.dtype):
        super().__init__()
        self.cfg, self.first, self.last, self.act_dtype = decoder.cfg, first, last, act_dtype
        self.block_ids = list(layers)
        moe = [i for i, ffn in enumerate(self.cfg.ffns) if ffn == "moe"]
        self.moe_layers = [moe.index(i) for i in self.block_ids if i in moe]  # numbered among the model's
        self.embeddings = decoder.embeddings if first else None
        self.layers = nn.ModuleDict({str(i): decoder.layers[i] for i in layers})
        self.norm = decoder.norm if last else None
        self.lm_head = decoder.lm_head if last else None
        self._contexts, self._labels, self._scale = [], [], None
        self._balance: Callable | None = None
        self.loss_sums: list[torch.Tensor] = []
        self.router: list[list] = []  # per micro-batch: RouterStats of this stage's MoE layers

    def blocks(self) -> list[nn.Module]:
        return list(self.layers.values())

    def weight_parts(self) -> list[nn.Module | None]:
        """`Decoder.weight_parts()` in the decoder's order, None for the parts other stages hold,
        so that every part is initialised from its own seed whichever rank holds it."""
        blocks = dict(zip(self.block_ids, self.blocks()))
        parts = [self.embeddings] + [blocks.get(i) for i in range(self.cfg.num_layers)] + [self.norm]
        return parts + ([self.lm_head] if not self.cfg.tie_word_embeddings else [])

    def begin_step(self, contexts: list, labels: list, scale: torch.Tensor, balance: Callable) -> None:
        """contexts, labels: per micro-batch, on the device; scale: the loss normalisation;
        balance(list of RouterStats) -> the micro-batch's balance-loss term (0-dim tensor)."""
        self._contexts, self._labels, self._scale, self._balance = contexts, labels, scale, balance
        self.loss_sums, self.router = [], []

    def forward(self, *activations, micro: torch.Tensor):
        i = int(micro.reshape(-1)[0])
        ctx = self._contexts[i]
        if self.first:
            h = Decoder.embed(self, activations[0], ctx)
            aux = torch.zeros(1, dtype=torch.float32, device=h.device)
        else:  # received as [1, B*T, hidden]: back to the layout of this micro-batch's context
            h, aux = activations
            b, t = ctx.position_ids.shape
            h = h.reshape(1, b * t, -1) if ctx.packed else h.reshape(b, t, -1)
        stats = []
        for block in self.blocks():
            h, s = block(h, ctx)
            if s is not None:
                stats.append(s)
        self.router.append(stats)
        if stats:
            aux = aux + self._balance(stats).reshape(1)
        if not self.last:
            # a fresh tensor, not a view of the last block's output: FSDP2 warns on every step
            # about views returned by a unit (in-place ops on them would skip its pre-backward hook)
            return h.reshape(1, -1, h.shape[-1]).to(self.act_dtype, copy=True), aux
        loss_sum = Decoder.head_loss(self, h, self._labels[i])
        self.loss_sums.append(loss_sum.detach())
        return (loss_sum * self._scale).reshape(1) + aux


class Pipeline:
    """The schedule of this rank's stage: `step(parts)` runs one optimizer step's forwards and
    backwards over the micro-batches `parts` (the trainer's: input_ids, labels, ctx on the device)."""

    def __init__(self, stage: Stage, pp_rank: int, pp: int, group, device: torch.device, micro_batches: int,
                 micro_batch: int, tokens: int, bounds: list[range]):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B

        self.module, self.micro_batches = stage, micro_batches
        self.bounds = [(r.start, r.stop - 1) for r in bounds]  # first and last block of each stage
        # what travels carries gradients back (the schedule sizes its buffers from these)
        hidden = torch.empty(1, micro_batch * tokens, stage.cfg.hidden_size, dtype=stage.act_dtype, device="meta",
                             requires_grad=True)
        aux = torch.empty(1, dtype=torch.float32, device="meta", requires_grad=True)
        ids = torch.empty(micro_batch, tokens, dtype=torch.long, device="meta")
        loss = torch.empty(1, dtype=torch.float32, device="meta")
        self.stage = PipelineStage(stage, pp_rank, pp, device, input_args=(ids,) if stage.first else (hidden, aux),
                                   output_args=loss if stage.last else (hidden, aux), group=group)
        self.schedule = Schedule1F1B(self.stage, micro_batches, loss_fn=lambda out, _target: out.sum(),
                                     scale_grads=False)

    def step(self, parts: list[dict]) -> None:
        micro = torch.arange(self.micro_batches)
        if self.module.first:
            self.schedule.step(torch.cat([p["input_ids"] for p in parts]), micro=micro)
        elif self.module.last:
            self.schedule.step(micro=micro, target=torch.zeros(self.micro_batches), losses=[])
        else:
            self.schedule.step(micro=micro)
