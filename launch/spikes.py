"""Firing analysis: run a trained model with spiking on sample text, report how its neurons fire.

    python launch/spikes.py CHECKPOINT [--data SHARDS] [--out DIR] [--samples 8] [--seq-len L]
                            [--k K] [--window 3] [--device auto|cpu|cuda] [--raster NAME]
                            [--neurons 64] [--tokens 8] [--seed 0] [--batch-size 8] [--overwrite]
                            [--json]

CHECKPOINT is a training checkpoint, a run directory (its latest checkpoint) or a directory from
launch/convert.py (which needs --data: token shards made with its tokenizer). The model runs with
spiking at k (default: its model.spike.k) on the selected projections (model.spike.targets),
whether or not it was trained with it. DIR (default RUN_DIR/analysis/step_NNNNNNNN/spikes for a
training checkpoint, outside the checkpoints that pruning deletes; CHECKPOINT/spikes for a
converted directory) gets report.json (per-projection and pooled firing statistics for every
spike coding, count histogram, losses with and without spiking) and PNG figures
(raster_<coding>.png, count_histogram.png, layers.png); it is written under a temporary sibling
name and renamed when complete. Prints a short summary (`--json`: one JSON line); errors exit
with status 1 and a message.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    from launch.cli import emit, parser
    from analysis.evaluate import add_cli_args, resolve_device

    ap = parser(__doc__)
    add_cli_args(ap, 8, "sample sequences")
    ap.add_argument("--out", default=None, help="output directory; None: RUN_DIR/analysis/"
                    "step_NNNNNNNN/spikes (a converted directory: CHECKPOINT/spikes)")
    ap.add_argument("--window", type=int, default=3, help="time steps over which sparsity is measured")
    ap.add_argument("--raster", default=None, help="projection whose input the raster shows; "
                    "None: the first attention input, e.g. layers.0.attn.q_proj")
    ap.add_argument("--neurons", type=int, default=64, help="features shown in the raster")
    ap.add_argument("--tokens", type=int, default=8, help="consecutive tokens shown in the raster")
    args = ap.parse_args(argv)

    from model.hf.checkpoint import check_output_dir
    from analysis.spike_report import analyze, default_out, save_report

    try:
        device = resolve_device(args.device)
        out = args.out or default_out(args.checkpoint)
        if args.out is None:
            os.makedirs(os.path.dirname(out), exist_ok=True)
        out = check_output_dir(out, args.overwrite)
        report, raster = analyze(args.checkpoint, data_path=args.data, samples=args.samples,
                                 seq_len=args.seq_len, k=args.k, window=args.window, device=device,
                                 seed=args.seed, batch_size=args.batch_size, raster=args.raster,
                                 neurons=args.neurons, tokens=args.tokens)
        report = save_report(out, report, raster, overwrite=args.overwrite)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    overall, loss = report["overall"], report["loss"]
    sparsity = {c: s["sparsity"] for c, s in overall["codings"].items()}
    emit({"out": out, "k": report["k"], "tokens": report["tokens"], "sparsity": sparsity,
          "le7": overall["le7"], "loss": loss},
         [("report", os.path.join(out, "report.json")),
          ("model", f"{report['model']}, spiking at k={report['k']:g} on {report['tokens']:,} tokens"),
          ("loss", f"{loss['float']:.4f} float, {loss['spiking']:.4f} spiking ({loss['delta']:+.4f})"),
          ("|s| <= 7", f"{overall['le7']:.1%} of counts"),
          *[(f"sparsity {c}", f"{v:.1%}") for c, v in sparsity.items()]],
         args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
