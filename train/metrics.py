"""Step metrics: console lines and `metrics.jsonl` (one JSON object per logged step)."""
from __future__ import annotations

import json
import logging
import math
import os
import time

from .observe import log_fields

log = logging.getLogger("train")


class MetricsLogger:
    """Accumulates per-step values between log points and writes their means (rank 0 only; the
    run directory exists once the run starts).

    peak_flops: one device's peak FLOP/s (`train.flops.device_peak_flops`), None when unknown;
    num_gpus: the devices of the run (world size), over which model FLOPs are spread."""

    def __init__(self, run_dir: str, enabled: bool, max_steps: int, peak_flops: float | None = None,
                 num_gpus: int = 1):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.enabled, self.max_steps = enabled, max_steps
        self.peak_flops, self.num_gpus = peak_flops, num_gpus
        self._reset(time.perf_counter())

    def _reset(self, now: float):
        self._t0, self._loss, self._loss_steps, self._steps, self._tokens = now, 0.0, 0, 0, 0

    def window(self) -> dict:
        """The loss sums of the steps since the last row (saved with a checkpoint)."""
        return {"loss": self._loss, "loss_steps": self._loss_steps}

    def restore(self, window: dict) -> None:
        """Continues the window of `window()` (a resume), so the next row averages the same steps
        as in an uninterrupted run; throughput counts only the steps since the resume."""
        self._loss, self._loss_steps = float(window["loss"]), int(window["loss_steps"])

    def exclude(self, seconds: float) -> None:
        """Leaves `seconds` spent on something else than training (an evaluation) out of the
        current window's throughput."""
        self._t0 += seconds

    def add(self, loss: float, tokens: int):
        """A non-finite loss (a skipped step) is left out of the mean."""
        if math.isfinite(loss):
            self._loss += loss
            self._loss_steps += 1
        self._steps += 1
        self._tokens += tokens

    def drop_rows_after(self, step: int) -> None:
        """Keeps the rows up to `step`: a resumed run rewrites what came after its checkpoint, a
        fresh one (step 0) drops the rows of an attempt stopped before its first checkpoint. A
        torn last line (a crash or full disk mid-append) is dropped with a warning; a damaged
        line before it is a ValueError naming the file and line."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            text = f.read()
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        keep, later = [], 0
        for n, line in lines:
            try:
                row = json.loads(line)
                if not isinstance(row.get("step"), int):
                    raise ValueError("no integer step")
            except (ValueError, AttributeError) as e:
                if n != lines[-1][0]:
                    raise ValueError(f"{self.path}, line {n}: damaged row ({e}); repair or delete that line") from None
                log.warning("%s: dropped a torn last line (%s...), written when a run stopped", self.path, line[:40])
                continue
            if row["step"] <= step:
                keep.append(line + "\n")
            else:
                later += 1
        if later:
            log.info("%s: dropped %d row(s) logged after step %d", self.path, later, step)
        if "".join(keep) != text:
            tmp = f"{self.path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, self.path)

    def flush(self, step: int, lr: float, grad_norm: float, total_tokens: int,
              model_flops: float | None = None, **extra) -> dict | None:
        """model_flops: model FLOPs of all ranks since the last flush (`model.flops`), for
        `tflops_per_gpu` and, with a known peak, `mfu` (a fraction of the peak)."""
        if not self._steps:
            return None
        now = time.perf_counter()
        elapsed = max(now - self._t0, 1e-9)
        row = {"step": step, "loss": self._loss / self._loss_steps if self._loss_steps else math.nan, "lr": lr, "grad_norm": grad_norm,
               "tokens": total_tokens, "tokens_per_s": self._tokens / elapsed}
        if model_flops is not None:
            per_gpu = model_flops / elapsed / self.num_gpus
            row["tflops_per_gpu"] = per_gpu / 1e12
            if self.peak_flops:
                row["mfu"] = per_gpu / self.peak_flops
        row.update(extra)
        self._reset(now)
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            log.info("step %d/%d | loss %.4f | lr %.2e | grad_norm %.3f | tokens %s | tok/s %s%s%s%s%s%s",
                     step, self.max_steps, row["loss"], lr, grad_norm, f"{total_tokens:,}",
                     f"{row['tokens_per_s']:,.0f}",
                     f" | TFLOP/s/GPU {row['tflops_per_gpu']:.3g}" if "tflops_per_gpu" in row else "",
                     f" | MFU {row['mfu']:.1%}" if "mfu" in row else "",
                     f" | peak {row['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in row else "",
                     f" | expert load max/mean {row['expert_load_max']:.2f}" if "expert_load_max" in row else "",
                     log_fields(row))
        return row
