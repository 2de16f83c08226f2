"""Spiking op speed on CUDA: the fused Triton kernel against the PyTorch reference.

    python launch/bench.py spike --out spike.json [--rows 8192] [--dims 3584 18944]

Times `spike_quantize` forward (output only, and with counts + statistics) for bf16 inputs
`[rows, D]`; prints a table and writes JSON. Needs a CUDA device.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ops.spike import spike_quantize  # noqa: E402
from ops.spike.reference import spike_quantize_reference  # noqa: E402


def bench_ms(fn, repeat: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--dims", type=int, nargs="+", default=[3584, 18944])
    ap.add_argument("--k", type=float, default=3.0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: the spike benchmark needs a CUDA device")
    rows = []
    print(f"{'D':>6} {'kernel ms':>10} {'GB/s':>8} {'kernel+stats ms':>16} {'reference ms':>13}")
    for d in args.dims:
        x = torch.randn(args.rows, d, device="cuda", dtype=torch.bfloat16)
        kernel = bench_ms(lambda: spike_quantize(x, args.k))
        with_stats = bench_ms(lambda: spike_quantize(x, args.k, return_counts=True, stats=True))
        reference = bench_ms(lambda: spike_quantize_reference(x, args.k, 1e-5, 1e4))
        gbps = 2 * x.numel() * x.element_size() / kernel / 1e6  # read x, write out
        rows.append({"rows": args.rows, "dim": d, "kernel_ms": kernel, "kernel_stats_ms": with_stats,
                     "reference_ms": reference, "kernel_gb_per_s": gbps})
        print(f"{d:>6} {kernel:>10.3f} {gbps:>8.0f} {with_stats:>16.3f} {reference:>13.3f}")
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                          "results": rows}, indent=2))


if __name__ == "__main__":
    main()
