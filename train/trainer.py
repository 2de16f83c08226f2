"""The training loop: gradient accumulation, mixed precision, clipping, schedule, metrics."""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist

from model.decoder import IGNORE_INDEX
from .metrics import MetricsLogger
from .optim import lr_at, set_lr

log = logging.getLogger("train")


class Trainer:
    """Runs `cfg.train.max_steps` optimizer steps.

    Each step takes this rank's slice of the global batch from the loader, splits it into
    micro-batches and accumulates gradients. The loss is normalised by the number of target
    tokens of the whole global batch, so accumulation and data-parallel size do not change the
    gradient (up to float summation order).
    """

    def __init__(self, cfg, mesh, model, optimizer, loader):
        self.cfg, self.mesh, self.model, self.optimizer, self.loader = cfg, mesh, model, optimizer, loader
        t = cfg.train
        self.local_batch = t.global_batch // mesh.dp
        self.micro_batch = t.micro_batch or self.local_batch
        if self.local_batch % self.micro_batch:
            raise ValueError(f"train.micro_batch={self.micro_batch} must divide the per-rank batch "
                             f"{self.local_batch} (train.global_batch={t.global_batch} / dp={mesh.dp})")
        self.step = 0
        self.tokens_seen = 0
        self.metrics = MetricsLogger(t.run_dir, mesh.is_main, t.max_steps)
        self.autocast_dtype = _autocast_dtype(t.precision, mesh.device)

    def fit(self) -> list[dict]:
        """Trains to max_steps; returns the logged metric rows (on every rank)."""
        t = self.cfg.train
        self.model.train()
        rows = []
        while self.step < t.max_steps:
            self.step += 1
            lr = lr_at(self.step, t)
            set_lr(self.optimizer, lr)
            loss, tokens, grad_norm = self.train_step()
            self.tokens_seen += tokens
            self.metrics.add(loss, tokens)
            if self.step == 1 or self.step % t.log_every == 0 or self.step == t.max_steps:
                row = self.metrics.flush(self.step, lr, grad_norm, self.tokens_seen)
                if row:
                    rows.append(row)
        return rows

    def train_step(self) -> tuple[float, int, float]:
        """One optimizer step. Returns (mean token loss over the global batch, global tokens, grad norm)."""
        device = self.mesh.device
        batch = self.loader.next_batch()
        num_targets = _all_reduce_sum((batch["labels"] != IGNORE_INDEX).sum().to(device))
        scale = self.mesh.dp / num_targets.clamp(min=1).float()  # DP averages gradients over ranks
        n_micro = self.local_batch // self.micro_batch
        loss_sum = torch.zeros((), device=device)
        for i in range(n_micro):
            part = {k: v[i * self.micro_batch:(i + 1) * self.micro_batch].to(device, non_blocking=True)
                    for k, v in batch.items()}
            sync = contextlib.nullcontext() if i == n_micro - 1 else _no_sync(self.model)
            with sync, self._autocast():
                out = self.model(part["input_ids"], position_ids=part["position_ids"], labels=part["labels"])
                loss = out.loss_sum * scale + out.aux_loss / n_micro
            loss.backward()
            loss_sum += out.loss_sum.detach()
        clip = self.cfg.train.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        global_loss = _all_reduce_sum(loss_sum) / num_targets.clamp(min=1)
        tokens = self.loader.tokens_per_step
        return float(global_loss), tokens, float(grad_norm)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.mesh.device.type, dtype=self.autocast_dtype)


def _autocast_dtype(precision: str, device: torch.device):
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def _no_sync(model):
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()
