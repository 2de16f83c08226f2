"""W8ASpike post-training quantisation: INT8 weights (symmetric, per-group scales) + spikes.

    python launch/quantize.py CHECKPOINT DST [--data SHARDS] [--samples 128] [--eval-samples 64]
                              [--seq-len L] [--group-size 128] [--k K] [--device auto|cpu|cuda]
                              [--dtype bf16|fp32] [--overwrite] [--json]

CHECKPOINT is a training checkpoint, a run directory (its latest checkpoint) or a directory from
launch/convert.py (which needs --data: token shards made with its tokenizer). Calibration uses
the first --samples sequences of the sample text, evaluation the --eval-samples after them. DST
gets the quantised model (int8 weights + scales, config.json with quantization_config) and
w8aspike_report.json with the losses of the float, spiking, INT8-only, uncalibrated and
calibrated W8ASpike models. Prints a table of the losses (`--json`: the report as one JSON line);
errors exit with status 1.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    from launch.cli import emit, megabytes, parser
    from analysis.evaluate import add_cli_args, resolve_device

    ap = parser(__doc__)
    add_cli_args(ap, 128, "calibration sequences")
    ap.add_argument("dst", help="output directory (must not exist unless --overwrite)")
    ap.add_argument("--eval-samples", type=int, default=64, help="evaluation sequences (after them)")
    ap.add_argument("--group-size", type=int, default=128, help="input features per weight scale")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"],
                    help="dtype of the tensors left in floating point")
    args = ap.parse_args(argv)

    import torch

    from analysis.quantize import w8aspike

    try:
        device = resolve_device(args.device)
        report = w8aspike(args.checkpoint, args.dst, data_path=args.data, samples=args.samples,
                          eval_samples=args.eval_samples, seq_len=args.seq_len,
                          batch_size=args.batch_size, group_size=args.group_size, k=args.k,
                          seed=args.seed, device=device, overwrite=args.overwrite,
                          dtype={"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype])
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    loss = report["loss"]
    emit(report, [
        ("exported", f"{report['exported']} ({megabytes(report['bytes'])}, {report['modules']} int8 "
                     f"modules, group size {report['group_size']}, k={report['k']:g})"),
        ("eval tokens", f"{report['eval']['tokens']:,}"),
        *[(f"loss {name}", f"{value:.4f}" + (f" ({report['delta'][name]:+.4f}, "
                                             f"{report['relative_pct'][name]:+.2f}%)"
                                             if name in report["delta"] else ""))
          for name, value in loss.items()],
    ], args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
