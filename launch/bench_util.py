"""Timing and reporting shared by the GPU benchmark scripts (`launch/bench.py op|layer|model`)."""
from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path

import torch


def cuda_ms(fn, *, warmup: int = 3, repeat: int = 10) -> float:
    """Median milliseconds of `fn()` on the current CUDA stream (each call timed by events)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_gib(fn) -> float:
    """Peak GiB allocated by one call of `fn()` above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 30


def environment() -> dict:
    """Device and library versions a result was measured with."""
    env = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
           "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    for name in ("fla", "transformers", "liger_kernel"):
        try:
            module = __import__(name)
            env[name] = getattr(module, "__version__", "?")
        except ImportError:
            pass
    return env


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec); missing values print as '-'."""
    widths = [max(len(h), 9) for _, h, _ in columns]
    print("  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths)))
    for row in rows:
        cells = []
        for (key, _, spec), w in zip(columns, widths):
            value = row.get(key)
            cells.append(("-" if value is None else format(value, spec)).rjust(w))
        print("  ".join(cells))


def write_json(path: str | None, mode: str, args: dict, rows: list[dict]) -> None:
    if path:
        Path(path).write_text(json.dumps({"mode": mode, **environment(), "args": args, "results": rows},
                                         indent=2))
        print(f"wrote {path}")


def require_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        raise SystemExit(f"error: the {what} benchmark needs a CUDA device")


def document_lengths(total: int, median: int, seed: int = 0) -> list[int]:
    """Log-normal document lengths (sigma 1, the given median) packed to exactly `total` tokens,
    the last document cut at the end like the launcher's packing."""
    gen = torch.Generator().manual_seed(seed)
    lengths, used = [], 0
    while used < total:
        n = max(1, int(median * float(torch.empty(()).log_normal_(0.0, 1.0, generator=gen))))
        n = min(n, total - used)
        lengths.append(n)
        used += n
    return lengths


def cu_seqlens_of(lengths: list[int], device) -> torch.Tensor:
    """[N+1] int32 cumulative boundaries."""
    return torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
