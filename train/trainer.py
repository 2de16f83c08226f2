"""The training loop: gradient accumulation, mixed precision, clipping, schedule, metrics,
checkpoints, stop signals, and the faults of long runs (skipped steps, rollback, time limit,
hang watchdog: train/faults.py, train/watchdog.py)."""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time

import torch

from model.context import SequenceContext
from model.decoder import IGNORE_INDEX
from model.flops import ModelFlops, document_lengths
from parallel import comm
from parallel.parallelize import compute_dtype
from parallel.sequence import ShardedSequenceContext
from .checkpoint import Checkpointer, stage
from .errors import TrainingError
from .faults import Faults, TimeLimit
from .flops import device_peak_flops
from .metrics import MetricsLogger
from .observe import Observer
from .optim import lr_at, set_lr
from .resume import load_checkpoint
from .validate import Validator
from .watchdog import Watchdog

log = logging.getLogger("train")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def batch_split(t, dp: int) -> tuple[int, int]:
    """(sequences per rank per step, sequences per micro-batch) for TrainConfig `t` on `dp` ranks;
    ValueError naming the setting when they do not divide."""
    if t.global_batch % dp:
        raise ValueError(f"train.global_batch={t.global_batch} must be divisible by the data-parallel "
                         f"size {dp}")
    local = t.global_batch // dp
    micro = t.micro_batch or local
    if local % micro:
        raise ValueError(f"train.micro_batch={micro} must divide the per-rank batch {local} "
                         f"(train.global_batch={t.global_batch} / dp={dp})")
    return local, micro


class _Routed:
    """What `Trainer._balance_loss` reads of a model output, for one pipeline stage's MoE layers."""

    def __init__(self, router: list):
        self.router = router
        self.aux_loss = sum((s.balance_loss() for s in router), torch.zeros((), device=router[0].prob_sum.device))


class Trainer:
    """Runs `cfg.train.max_steps` optimizer steps.

    Each step takes this rank's slice of the global batch from the loader, splits it into
    micro-batches and accumulates gradients. The loss is normalised by the number of target
    tokens of the whole global batch, so accumulation and data-parallel size do not change the
    gradient (up to float summation order).

    Checkpoints are saved every `train.save_every` steps, at the end of `fit` and when SIGTERM or
    SIGUSR1 arrives (then at the end of the current step, after which `fit` returns normally and
    the process exits with code 0). A checkpoint that cannot be written (a full disk) stops the
    run with a TrainingError at the end of the step in which its background write failed. A
    step whose loss or gradient norm is NaN/Inf, or whose loss is a spike, is skipped (no
    optimizer update) and counted in `skipped_steps`; too many in a row roll the run back to its
    last checkpoint once (train/faults.py). `train.max_hours` saves and stops in time for a
    scheduler's limit; `train.hang_timeout` ends a rank that makes no progress (train/watchdog.py).
    """

    def __init__(self, cfg, mesh, engine, optimizer, loader):
        """engine: `parallel.Engine` (the model to train and its data-parallel engine)."""
        self.cfg, self.mesh, self.engine, self.optimizer, self.loader = cfg, mesh, engine, optimizer, loader
        self.model = engine.module
        t = cfg.train
        self.local_batch, self.micro_batch = batch_split(t, mesh.dp)
        self.step = 0
        self.tokens_seen = 0
        self.skipped_steps = 0         # in the whole run (saved in checkpoints)
        self.faults = Faults(t, mesh.is_main)  # spike window, skips in a row, rollbacks (saved too)
        self.time_limit = TimeLimit(t.max_hours)
        self.watchdog = Watchdog(t.hang_timeout, t.run_dir, mesh.rank)
        self.metrics = MetricsLogger(t.run_dir, mesh.is_main, t.max_steps,
                                     device_peak_flops(mesh.device, t.peak_tflops), mesh.world_size)
        self.flops = ModelFlops(cfg.model)
        self.flops_since_log = 0  # this rank's model FLOPs since the last metrics row
        self.load_since_log: torch.Tensor | None = None  # [MoE layers, E] routed slots, this rank
        self.autocast_dtype = compute_dtype(t.precision, mesh.device)
        self.global_balance = cfg.model.moe.balance == "global" and "moe" in cfg.model.ffns
        self.checkpointer = Checkpointer(t.run_dir, mesh, t.keep_checkpoints)
        self.saved_step: int | None = None  # step of the newest checkpoint this run holds
        self.save_stall_s: float | None = None  # how long the last save held training up
        self.stop_reason: str | None = None
        self.validator = Validator.for_run(cfg, mesh, loader, self.micro_batch)  # None: no eval
        self.observe = Observer(cfg, mesh, self.model)  # balance loss, firing rates, progress bar, wandb

    def resume(self, path: str, keep_loader: bool = False) -> dict:
        """Continues from checkpoint directory `path`, and its logging window; returns its
        state.json. keep_loader: leave the data loader where it is (a rollback)."""
        state = load_checkpoint(path, self, self.model, keep_loader=keep_loader)
        self.saved_step = self.step
        self.metrics.drop_rows_after(self.step)  # rows a crashed attempt logged past the checkpoint
        window = state.get("log_window")  # checkpoints without one start a new window
        self.observe.restore(window or {})
        if window:
            self.metrics.restore(window)
            if "expert_load" in window and self.mesh.is_main:  # summed over the ranks at the next row
                self.load_since_log = torch.tensor(window["expert_load"], device=self.mesh.device)
        return state

    def log_window(self) -> dict:
        """The logging window since the last row, for a checkpoint: the loss sums and, with MoE,
        the expert load summed over all ranks (a collective: every rank calls this)."""
        window = {**self.metrics.window(), **self.observe.window()}
        if "moe" in self.cfg.model.ffns:
            window["expert_load"] = comm.all_reduce(self._load_counts(), group=self.mesh.world_group).tolist()
        return window

    def save(self, blocking: bool = False) -> None:
        """Stages the state to CPU now; the files are written in the background unless `blocking`.
        The time training waits (the previous write, then staging) is logged as the save stall."""
        start = time.perf_counter()
        self.checkpointer.save(lambda: stage(self, self.model), blocking=blocking)
        self.saved_step = self.step
        self.save_stall_s = time.perf_counter() - start
        if self.mesh.is_main:
            log.info("checkpoint of step %d staged in %.2f s%s", self.step, self.save_stall_s,
                     "" if blocking else ", writing in the background")

    def request_stop(self, reason: str) -> None:
        """Save and stop at the end of the current step (signal handlers call this)."""
        self.stop_reason = reason

    def fit(self) -> list[dict]:
        """Trains to max_steps (or a stop signal); returns the logged metric rows (on every rank)."""
        t = self.cfg.train
        self.model.train()
        rows = []
        if self.step >= t.max_steps and self.mesh.is_main:
            log.info("already at step %d of train.max_steps=%d: nothing to train (raise train.max_steps "
                     "to continue, or train.resume=never to start over)", self.step, t.max_steps)
        previous = self._install_signal_handlers()
        self.watchdog.start()
        self.time_limit.start()
        try:
            self.observe.start(self.step)
            while self.step < t.max_steps:
                self.step += 1
                self.watchdog.beat(self.step)
                lr = lr_at(self.step, t)
                set_lr(self.optimizer, lr)
                loss, tokens, grad_norm, skipped = self.train_step()
                self.tokens_seen += tokens
                self.observe.step_done(self.step, self.tokens_seen, loss, skipped)
                if self.faults.count(self, skipped):  # rolled back to the last checkpoint's step
                    rows = [r for r in rows if r["step"] <= self.step]
                    continue
                self.metrics.add(loss, tokens)
                val = self.validator(self) if self.validator else {}  # {"val_loss": ...} when due
                if val or self.step == 1 or self.step % t.log_every == 0 or self.step == t.max_steps:
                    row = self.metrics.flush(self.step, lr, grad_norm, self.tokens_seen, self._take_flops(),
                                             **val, skipped_steps=self.skipped_steps, **self.faults.row(),
                                             **self._stage(), **self._device_metrics(),
                                             **self._take_expert_load(), **self.observe.row_fields())
                    if row:
                        rows.append(row)
                        self.observe.publish(row)
                if self.time_limit.due(self.save_stall_s, self.checkpointer.last_write_s) and not self.stop_reason:
                    self.request_stop(self.time_limit.reason())
                if self._stop_requested():
                    self.save()
                    if self.mesh.is_main:
                        log.info("%s: saved a checkpoint at step %d and stopping", self.stop_reason, self.step)
                    break
                if t.save_every and self.step % t.save_every == 0:
                    self.save()
            self.watchdog.beat(self.step, "final checkpoint", long=True)
            if self.saved_step != self.step:
                self.save()
            self.checkpointer.wait()
        except BaseException:
            self.observe.close(failed=True)
            with contextlib.suppress(Exception):  # keep the original error; finish the write in flight
                self.checkpointer.wait()
            raise
        finally:
            self.observe.close()
            self.watchdog.stop()
            self._restore_signal_handlers(previous)
        return rows

    def _stage(self) -> dict:
        """The recipe stage of the run (`train.stage`) for a metrics row; {} outside a recipe."""
        return {"stage": self.cfg.train.stage} if self.cfg.train.stage else {}

    def _device_metrics(self) -> dict:
        """Peak device memory of this rank since the last log (CUDA), and the last save stall."""
        out = {} if self.save_stall_s is None else {"save_stall_s": round(self.save_stall_s, 3)}
        if self.mesh.device.type == "cuda":
            out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.mesh.device) / 2**30, 3)
            torch.cuda.reset_peak_memory_stats(self.mesh.device)
        return out

    def _take_flops(self) -> float:
        """Model FLOPs of all data-parallel ranks since the last metrics row (one all-reduce per
        row, not per step); resets this rank's count."""
        local, self.flops_since_log = self.flops_since_log, 0
        total = torch.tensor(float(local), dtype=torch.float64, device=self.mesh.device)
        return float(comm.all_reduce(total, group=self.mesh.dp_group))

    def _take_expert_load(self) -> dict:
        """Expert load since the last metrics row (one all-reduce per row): `expert_load`, per MoE
        layer the share of routed (token, slot) pairs each expert got over the whole global
        batch, and `expert_load_max`, the busiest expert's share over the mean share (1 =
        balanced; E = one expert took everything), the largest over layers. {} without MoE."""
        if "moe" not in self.cfg.model.ffns:
            return {}
        # a pipeline stage without MoE layers contributes zeros to the other stages' rows
        counts = comm.all_reduce(self._load_counts(), group=self.mesh.world_group)
        self.load_since_log = None
        share = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
        return {"expert_load": [[round(x, 5) for x in layer] for layer in share.tolist()],
                "expert_load_max": round(float(share.max(dim=1).values.max()) * share.shape[1], 4)}

    def _stop_requested(self) -> bool:
        """Whether any rank got a stop signal; all ranks agree so they save the same step. A
        background checkpoint write that failed on any rank stops every rank here, with its error."""
        flags = torch.tensor([float(self.stop_reason is not None), float(self.checkpointer.failed())],
                             device=self.mesh.device)
        stop, failed = comm.all_reduce(flags, "max", self.mesh.world_group).tolist()
        if failed:
            self.checkpointer.wait()  # raises this rank's error when its write failed too
            raise TrainingError("writing a checkpoint failed on another rank (its error is in that rank's log)")
        if stop and self.stop_reason is None:
            self.stop_reason = "stop signal on another rank"
        return bool(stop)

    def _install_signal_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}  # signal.signal only works in the main thread
        previous = {}
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, lambda signum, _frame: self.request_stop(
                f"received {signal.Signals(signum).name}"))
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def train_step(self) -> tuple[float, int, float, bool]:
        """One optimizer step. Returns (mean token loss over the global batch, global tokens, grad
        norm, skipped): a non-finite loss or gradient norm, or a loss spike, skips the update.
        Both values are the same on every rank (all-reduced), so all ranks skip together."""
        device, dp_group = self.mesh.device, self.mesh.dp_group
        batch = self.loader.next_batch()
        # counted on the host from the CPU batch (no device sync); the MoE routing pass of
        # _step_expert_load is overhead, not model FLOPs, like recomputation. SP ranks hold the
        # same rows, so dp ranks alone sum to the global batch
        self.flops_since_log += self.flops.step(document_lengths(batch["position_ids"]))
        num_targets = comm.all_reduce((batch["labels"] != IGNORE_INDEX).sum().to(device), group=dp_group)
        # the engine averages gradients over the dp x sp ranks sharing the weights
        scale = self.mesh.shard_size / num_targets.clamp(min=1).float()
        n_micro = self.local_batch // self.micro_batch
        parts = [self._part({k: v[i * self.micro_batch:(i + 1) * self.micro_batch] for k, v in batch.items()})
                 for i in range(n_micro)]
        if self.engine.pipeline is not None:
            loss_sum = self._pipeline_step(parts, scale, n_micro)
        else:
            loss_sum = self._accumulate(parts, scale, n_micro)
        grad_norm = self.engine.clip_grad_norm(self.cfg.train.grad_clip)
        # the loss is known on the last pipeline stage (every rank without pipeline parallelism)
        global_loss = float(comm.all_reduce(loss_sum, group=self.mesh.world_group) / num_targets.clamp(min=1))
        skipped = self.faults.skip(global_loss, grad_norm)
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return global_loss, self.loader.tokens_per_step, grad_norm, skipped

    def _accumulate(self, parts: list[dict], scale: torch.Tensor, n_micro: int) -> torch.Tensor:
        """Forward and backward of every micro-batch, gradients accumulating; returns the summed
        token loss of this rank's micro-batches."""
        step_load = self._step_expert_load(parts) if self.global_balance and n_micro > 1 else None
        loss_sum = torch.zeros((), device=self.mesh.device)
        for i, part in enumerate(parts):
            self.engine.micro_batch(last=i == n_micro - 1)
            with self._autocast():
                out = self.model(part["input_ids"], labels=part["labels"], ctx=part["ctx"])
                balance = self._balance_loss(out, step_load, n_micro)
                loss = out.loss_sum * scale + balance
            self.observe.add_balance(balance)
            loss.backward()
            loss_sum += out.loss_sum.detach()
            self._count_load(out.router, range(len(out.router)))
        return loss_sum

    def _pipeline_step(self, parts: list[dict], scale: torch.Tensor, n_micro: int) -> torch.Tensor:
        """The step's micro-batches through this rank's pipeline stage (1F1B); returns the summed
        token loss of this rank's micro-batches on the last stage, 0 elsewhere. Each stage adds
        its MoE layers' balance loss of each micro-batch (model.moe.balance=micro)."""
        stage = self.model

        def balance(stats):
            term = self._balance_loss(_Routed(stats), None, n_micro)
            self.observe.add_balance(term)
            return term

        stage.begin_step([p["ctx"] for p in parts], [p["labels"] for p in parts], scale, balance)
        with self._autocast():
            self.engine.pipeline.step(parts)
        for stats in stage.router:
            self._count_load(stats, stage.moe_layers)
        if stage.last:
            return torch.stack(stage.loss_sums).sum()
        return torch.zeros((), device=self.mesh.device)

    def _count_load(self, router: list, layers) -> None:
        """Adds one forward's routed slots per expert (`router`: RouterStats of the MoE layers
        numbered `layers` among the model's) to the expert load since the last metrics row."""
        if router:
            self._load_counts()[list(layers)] += torch.stack([r.counts for r in router])

    def _load_counts(self) -> torch.Tensor:
        """The expert load since the last metrics row [MoE layers, E] (zeros when none yet)."""
        if self.load_since_log is None:
            m = self.cfg.model
            self.load_since_log = torch.zeros(m.ffns.count("moe"), m.moe.num_experts, device=self.mesh.device)
        return self.load_since_log

    def _part(self, part: dict) -> dict:
        """One micro-batch of full rows [b, T] (host tensors) -> this rank's inputs on the device
        and their sequence context. Document boundaries are found on the host batch: on the device
        that would stall the host once per micro-batch while the previous backward drains. Under
        sequence parallelism the rank keeps its time slice of every row."""
        mesh, device = self.mesh, self.mesh.device
        if mesh.sp > 1:
            p = self.cfg.parallel
            ctx = ShardedSequenceContext.slice(part["position_ids"], mesh.sp_rank, mesh.sp, mesh.sp_group,
                                               linear=p.sp_linear, softmax=p.sp_softmax)
            part = {k: ctx.slice_tokens(v) for k, v in part.items()}
        else:
            ctx = SequenceContext.from_position_ids(part["position_ids"])
        return {**{k: v.to(device, non_blocking=True) for k, v in part.items()}, "ctx": ctx.to(device)}

    def _balance_loss(self, out, step_load, n_micro: int) -> torch.Tensor:
        """The MoE balance-loss term of one micro-batch's backward (model.moe.balance).

        micro: each micro-batch's own balance loss, averaged. global: expert load counted over the
        whole optimizer step (`step_load`, or this forward's load summed over the dp ranks when
        the step is one micro-batch), so the summed terms of all micro-batches and ranks are the
        balance loss of the global batch, whatever the accumulation and dp size."""
        if not out.router:
            return out.aux_loss
        sp = self.mesh.sp
        if not self.global_balance:
            if sp == 1:
                return out.aux_loss / n_micro
            # the micro-batch's load over all its tokens, which SP splits over ranks; summed over
            # them (the engine averages over sp as well)
            counts, tokens = self._sum_load([out.router], self.mesh.sp_group)
            return sp * sum(s.balance_loss(c, tokens) for s, c in zip(out.router, counts)) / n_micro
        if step_load is None:
            step_load = self._sum_load([out.router])
        counts, tokens = step_load
        # the engine averages gradients over the dp x sp ranks: undo that for this sum
        return self.mesh.shard_size * sum(s.balance_loss(c, tokens) for s, c in zip(out.router, counts))

    @torch.no_grad()
    def _step_expert_load(self, parts) -> tuple[torch.Tensor, int]:
        """Routing pass over every micro-batch of the step (no gradients, no LM head): the expert
        load of the whole global batch, known before the first backward."""
        routed = []
        for part in parts:
            with self._autocast():
                routed.append(self.model(part["input_ids"], ctx=part["ctx"], route_only=True).router)
        return self._sum_load(routed)

    def _sum_load(self, routed: list, group=False) -> tuple[torch.Tensor, int]:
        """routed: per forward pass, its list of RouterStats -> (counts [layers, E] summed over
        passes and the ranks of `group` (default: every data- and sequence-parallel rank), tokens
        routed in all of them)."""
        group = self.mesh.dp_sp_group if group is False else group
        counts = torch.stack([torch.stack([s.counts for s in layers]) for layers in routed]).sum(0)
        tokens = torch.tensor([float(sum(layers[0].tokens for layers in routed))], device=counts.device)
        both = comm.all_reduce(torch.cat([counts.flatten(), tokens]), group=group)
        return both[:-1].view_as(counts), int(both[-1].item())

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.mesh.device.type, dtype=self.autocast_dtype)
