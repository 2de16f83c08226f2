"""Held-out validation loss during training (`train.eval_every`, on the `data.val_docs` split).

Every `train.eval_every` steps and at the last step, the ranks run the model in eval mode under
`no_grad` and the training autocast over all samples of the validation split
(`data.validation.ValidationSet`) and log their mean token loss as `val_loss` in that step's
metrics row. The whole split is evaluated every time, rather than a number of batches: a batch
count would cover other text whenever `data.seq_len` or the batch size change between stages,
while the split's documents stay the same.

Distribution: the samples are cut into `dp` contiguous slices, one per data-parallel rank, padded
(ignored labels) so that every rank runs the same number of forwards of `micro_batch` samples (the
sharded engine and expert parallelism exchange weights or tokens between dp ranks inside a forward),
and sequence-parallel ranks of a row each run their time slice of it, as in training. Loss sums are
all-reduced over the world and divided by the split's target tokens (known on every rank), so the
value is the same on every rank and for every world size up to float summation order.

Evaluation draws no random numbers from the training streams (the RNG state is restored after
it), so a run with evaluation trains exactly as one without, and an exact resume evaluates the
same. Its time is left out of the row's tokens/s. Under pipeline parallelism each micro-batch
goes through the stages one after the other (point-to-point sends of the hidden states; the
1F1B schedule is for training, whose backward the forwards overlap), the last stage summing the
loss.
"""
from __future__ import annotations

import logging
import time

import torch

from parallel import comm

log = logging.getLogger("train")


class Validator:
    """The validation samples of this rank and the loop that evaluates them."""

    def __init__(self, cfg, mesh, loader, micro_batch: int):
        """loader: the run's `data.Loader` (holds the split); micro_batch: sequences per forward."""
        self.every, self.max_steps = cfg.train.eval_every, cfg.train.max_steps
        self.mesh = mesh
        self.data = loader.validation_set()
        if not self.data.targets:
            raise ValueError(f"data.val_docs={loader.split.val_docs}: the held-out documents hold no "
                             f"token to predict (one-token documents); raise data.val_docs")
        per_rank = -(-self.data.num_samples // mesh.dp)
        self.micro = micro_batch
        self.forwards = -(-per_rank // micro_batch)
        self.first = mesh.dp_rank * self.forwards * micro_batch  # this rank's first sample
        if mesh.is_main:
            log.info("validation every %d steps: %d held-out documents, %s tokens, %d samples of %d "
                     "(%d forwards of %d per rank)", self.every, self.data.documents,
                     f"{self.data.tokens:,}", self.data.num_samples, self.data.seq_len,
                     self.forwards, micro_batch)

    @classmethod
    def for_run(cls, cfg, mesh, loader, micro_batch: int) -> "Validator | None":
        """The validator of a run with `train.eval_every`, None when evaluation is off (a run
        without a validation split says so once)."""
        if not cfg.train.eval_every:
            return None
        if not loader.split:
            if mesh.is_main:
                log.warning("train.eval_every=%d but the data has no validation split "
                            "(data.val_docs=0): no val_loss is logged; set data.val_docs to hold "
                            "out documents of each source, or train.eval_every=0",
                            cfg.train.eval_every)
            return None
        return cls(cfg, mesh, loader, micro_batch)

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.max_steps

    def __call__(self, trainer) -> dict:
        """{"val_loss": mean token loss} when `trainer.step` is due, else {}; every rank calls it.
        The time it takes is left out of the current metrics window's throughput."""
        if not self.due(trainer.step):
            return {}
        start = time.perf_counter()
        loss = self.evaluate(trainer)
        seconds = time.perf_counter() - start
        trainer.metrics.exclude(seconds)
        if self.mesh.is_main:
            log.info("step %d | val_loss %.4f | %s tokens in %.2f s", trainer.step, loss,
                     f"{self.data.tokens:,}", seconds)
        return {"val_loss": loss}

    def batches(self):
        """This rank's validation micro-batches: dicts of int64 host tensors `[micro, L]`."""
        for i in range(self.forwards):
            arrays = self.data.samples(self.first + i * self.micro, self.micro)
            yield {k: torch.from_numpy(v) for k, v in arrays.items()}

    def evaluate(self, trainer) -> float:
        """Mean token loss of the model over the whole validation split (a collective)."""
        model, device = trainer.model, self.mesh.device
        devices = [device] if device.type == "cuda" else []
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        watchdog = getattr(trainer, "watchdog", None)  # a large split takes longer than a step
        model.eval()
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                for batch in self.batches():
                    if watchdog is not None:
                        watchdog.beat(trainer.step, "validation")
                    part = trainer._part(batch)
                    with trainer._autocast():
                        if trainer.engine.pipeline is not None:
                            loss_sum += self._through_stages(model, part).double()
                        else:
                            out = model(part["input_ids"], labels=part["labels"], ctx=part["ctx"])
                            loss_sum += out.loss_sum.double()
        finally:
            model.train()
        total = comm.all_reduce(loss_sum, group=self.mesh.world_group)
        return float(total) / max(self.data.targets, 1)

    def _through_stages(self, stage, part: dict) -> torch.Tensor:
        """One micro-batch forward through the pipeline, stage after stage (no schedule: an
        evaluation has no backward to overlap): each stage receives the previous stage's hidden
        states, runs its blocks and sends them on; returns the summed token loss on the last
        stage, 0 elsewhere."""
        import torch.distributed as dist

        mesh, device = self.mesh, self.mesh.device
        group, rank = mesh.group("pp"), mesh.coordinate("pp")
        ctx = part["ctx"]
        zero = torch.zeros((), device=device)
        stage.begin_step([ctx], [part["labels"]], torch.ones((), device=device), lambda _stats: zero)
        micro = torch.zeros(1, dtype=torch.long)
        if stage.first:
            out = stage(part["input_ids"], micro=micro)
        else:
            b, t = ctx.position_ids.shape
            hidden = torch.empty(1, b * t, stage.cfg.hidden_size, dtype=stage.act_dtype, device=device)
            aux = torch.empty(1, dtype=torch.float32, device=device)
            for buffer in (hidden, aux):
                dist.recv(buffer, src=dist.get_global_rank(group, rank - 1), group=group)
            out = stage(hidden, aux, micro=micro)
        if not stage.last:
            for tensor in out:
                dist.send(tensor.contiguous(), dst=dist.get_global_rank(group, rank + 1), group=group)
            return zero
        return stage.loss_sums[-1]
