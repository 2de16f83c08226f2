"""What a run shows while it goes, besides the loss: the fields the trainer adds to each metrics
row and log line, the progress bar (train/progress.py) and wandb (train/wandb_log.py).

Row fields counted here, on the device between rows and read once per row (one all-reduce, no
host sync per step), like the expert load:
- `balance_loss` (MoE models): the balance loss the step's backward added (times
  `model.moe.aux_loss_coef`, all MoE layers), the mean over the window's applied steps.
- with `model.spike.enabled` (and `train.firing_stats`): `firing_rate` {target: share of spike
  counts s != 0} and `spike_count` {target: mean |s|, spikes per activation}, over every spiked
  input of the target group's projections, and `firing_rate_layers`, per decoder layer
  {target: share s != 0}. An input read by several spiked projections (q, k, v) counts once for
  each, like the quantiser runs once for each; recomputed forwards (train.recompute) count
  again, which leaves the shares unchanged. Cost per spiked projection and training forward: the
  three sums (fused into the Triton kernel on CUDA), a stack and an add into an int64 counter.
- `host_mem_gib`: rank 0's resident host memory at the row (Linux), which CPU offload and the
  staged checkpoints use (device memory is `peak_mem_gib`, on CUDA).
"""
from __future__ import annotations

import logging
import math
import os

import torch

from model.config import SPIKE_TARGETS
from model.spiking import STATS, spike_sites
from parallel import comm
from .progress import Progress
from .wandb_log import WandbLogger

log = logging.getLogger("train")


class FiringCounters:
    """Spike statistics of every spiked input, summed per (layer, target): an int64
    [num_layers + 1, targets, 3] grid (the last row: the LM head), the same shape on every rank
    and pipeline stage, so one all-reduce sums them.

    Each SpikeSite adds into its own int64 [3] tensor, gathered into the grid at read time: the
    compiled regions (train.compile) share their code between module instances, and views of
    one tensor would all be written through the first instance's view."""

    def __init__(self, model, num_layers: int, device: torch.device):
        self.num_layers = num_layers
        self.sites = spike_sites(model)
        slots = []
        for site in self.sites:
            site.stats = torch.zeros(len(STATS), dtype=torch.int64, device=device)
            layer = num_layers if site.layer is None else site.layer
            slots.append(layer * len(SPIKE_TARGETS) + SPIKE_TARGETS.index(site.target))
        self.slots = torch.tensor(slots, dtype=torch.int64, device=device)
        self.carried = torch.zeros(num_layers + 1, len(SPIKE_TARGETS), len(STATS), dtype=torch.int64, device=device)

    def _grid(self) -> torch.Tensor:
        grid = self.carried.clone()
        if self.sites:
            grid.view(-1, len(STATS)).index_add_(0, self.slots, torch.stack([s.stats for s in self.sites]))
        return grid

    def _reset(self) -> None:
        self.carried.zero_()
        for site in self.sites:
            site.stats.zero_()

    def take(self, group) -> dict:
        """The row fields of the counts since the last call, summed over `group`; resets them."""
        total = comm.all_reduce(self._grid(), group=group).tolist()
        self._reset()
        return fields(total, self.num_layers)

    def window(self, group) -> list:
        """The counts so far summed over `group` (a collective), for a checkpoint's log window."""
        return comm.all_reduce(self._grid(), group=group).tolist()

    def restore(self, counts: list | None) -> None:
        """Continues from `window()`'s counts (None: from zero)."""
        self._reset()
        if counts is None:
            return
        restored = torch.tensor(counts, dtype=torch.int64)
        if restored.shape != self.carried.shape:
            log.warning("the checkpoint's firing counts have another shape; the next row counts from the resume")
            return
        self.carried.copy_(restored)


def fields(counts: list, num_layers: int) -> dict:
    """counts [num_layers + 1][targets][numel, zeros, abs_sum] -> the row fields (module doc);
    {} when nothing was counted."""
    rate, count, layers = {}, {}, []
    for i, target in enumerate(SPIKE_TARGETS):
        n, zeros, spikes = (sum(layer[i][j] for layer in counts) for j in range(len(STATS)))
        if n:
            rate[target] = round(1 - zeros / n, 5)
            count[target] = round(spikes / n, 5)
    for layer in counts[:num_layers]:
        layers.append({t: round(1 - c[1] / c[0], 5) for t, c in zip(SPIKE_TARGETS, layer) if c[0]})
    if not rate:
        return {}
    return {"firing_rate": rate, "spike_count": count, "firing_rate_layers": layers}


def host_memory_gib() -> float | None:
    """This process's resident set size in GiB (Linux /proc), None where unknown."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**30, 3)


def log_fields(row: dict) -> str:
    """What the log line adds for the fields of this module and the skipped steps."""
    parts = []
    if "balance_loss" in row:
        parts.append(f"balance {row['balance_loss']:.4g}")
    if row.get("firing_rate"):
        parts.append("firing " + " ".join(f"{t} {r:.3f}" for t, r in row["firing_rate"].items()))
    if row.get("skipped_steps"):
        parts.append(f"skipped {row['skipped_steps']}")
    if "host_mem_gib" in row:
        parts.append(f"host {row['host_mem_gib']:.1f} GiB")
    return "".join(f" | {p}" for p in parts)


class Observer:
    """The trainer's one object for this module: counters, progress bar and wandb.

    Every rank calls `row_fields` and `window` (collectives); the bar and wandb live on rank 0."""

    def __init__(self, cfg, mesh, model):
        m, t = cfg.model, cfg.train
        self.mesh = mesh
        self.moe = "moe" in m.ffns
        self._step_balance = torch.zeros((), device=mesh.device) if self.moe else None
        self._balance = torch.zeros((), dtype=torch.float64, device=mesh.device) if self.moe else None
        self._balance_steps = 0
        self.firing = (FiringCounters(model, m.num_layers, mesh.device)
                       if m.spike.enabled and t.firing_stats else None)
        self.progress = Progress(t.progress, mesh.is_main, t.max_steps, getattr(t, "stage", ""))
        self.wandb = WandbLogger(cfg, mesh.is_main)

    # ------------------------------------------------------------------ the training loop
    def start(self, step: int) -> None:
        """At the start of `fit`; step > 0: a resumed run (its wandb run continues)."""
        self.wandb.start(resumed=step > 0)
        self.progress.start(step)

    def add_balance(self, term: torch.Tensor) -> None:
        """One micro-batch's balance-loss term of the backward (this rank's share)."""
        if self._step_balance is not None and isinstance(term, torch.Tensor):
            self._step_balance += term.detach().float()

    def step_done(self, step: int, tokens: int, loss: float, skipped: bool) -> None:
        """After each optimizer step: a skipped step's balance loss stays out of the mean."""
        if self._step_balance is not None:
            if not skipped:
                self._balance += self._step_balance
                self._balance_steps += 1
            self._step_balance.zero_()
        self.progress.update(step, tokens, loss)

    def row_fields(self) -> dict:
        """The row fields counted since the last row (module doc), summed over all ranks; resets."""
        out = {}
        world = self.mesh.world_group
        if self.moe:
            # the engine averages gradients over the dp x sp ranks, so the rank terms' sum over
            # them is the loss; pipeline stages hold different layers and add up
            total = float(comm.all_reduce(self._balance, group=world)) / self.mesh.shard_size
            if self._balance_steps:
                out["balance_loss"] = total / self._balance_steps
            self._balance.zero_()
            self._balance_steps = 0
        if self.firing is not None:
            out.update(self.firing.take(world))
        host = host_memory_gib()
        if host is not None:
            out["host_mem_gib"] = host
        return out

    def publish(self, row: dict) -> None:
        self.wandb.log(row)

    def close(self, failed: bool = False) -> None:
        """At the end of `fit` (idempotent): closes the bar, finishes the wandb run."""
        self.progress.close()
        self.wandb.finish(failed)

    # ------------------------------------------------------------------ checkpoints
    def window(self) -> dict:
        """The counts since the last row, summed over all ranks (a collective), for a checkpoint."""
        out = {}
        world = self.mesh.world_group
        if self.moe:
            out["balance_loss"] = float(comm.all_reduce(self._balance, group=world))
            out["balance_steps"] = self._balance_steps
        if self.firing is not None:
            out["firing"] = self.firing.window(world)
        return out

    def restore(self, window: dict) -> None:
        """Continues the window of a checkpoint (`window()`): rank 0 holds the sums (the next row
        adds every rank's), so a resumed run logs the rows of an uninterrupted one."""
        main = self.mesh.is_main
        if self.moe:
            value = window.get("balance_loss") if main else None
            self._balance.fill_(value if isinstance(value, (int, float)) and math.isfinite(value) else 0.0)
            self._balance_steps = int(window.get("balance_steps", 0))
            self._step_balance.zero_()
        if self.firing is not None:
            self.firing.restore(window.get("firing") if main else None)
