"""Firing analysis: run a trained model with spiking on sample text, report how its neurons fire.

    python launch/spikes.py CHECKPOINT [--data SHARDS] [--out DIR] [--samples 8] [--seq-len L]
                            [--k K] [--window 3] [--device auto|cpu|cuda] [--raster NAME]
                            [--neurons 64] [--tokens 8] [--seed 0] [--batch-size 8] [--overwrite]

CHECKPOINT is a training checkpoint, a run directory (its latest checkpoint) or a directory from
launch/convert.py (which needs --data: token shards made with its tokenizer). The model runs with
spiking at k (default: its model.spike.k) on the selected projections (model.spike.targets),
whether or not it was trained with it. DIR (default CHECKPOINT_DIR/spikes) gets report.json
(per-projection and pooled firing statistics for every spike coding, count histogram, losses with
and without spiking) and PNG figures (raster_<coding>.png, count_histogram.png, layers.png); it
is written under a temporary sibling name and renamed when complete. Prints one JSON summary
line; errors exit with status 1 and a message.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    from train.evaluate import add_cli_args, resolve_device

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_cli_args(ap, 8, "sample sequences")
    ap.add_argument("--out", default=None, help="output directory (default: CHECKPOINT_DIR/spikes)")
    ap.add_argument("--window", type=int, default=3, help="time steps over which sparsity is measured")
    ap.add_argument("--raster", default=None, help="projection whose input the raster shows "
                    "(default: the first attention input, e.g. layers.0.attn.q_proj)")
    ap.add_argument("--neurons", type=int, default=64, help="features shown in the raster")
    ap.add_argument("--tokens", type=int, default=8, help="consecutive tokens shown in the raster")
    args = ap.parse_args(argv)

    from model.hf.checkpoint import check_output_dir
    from train.spike_report import analyze, default_out, save_report

    try:
        device = resolve_device(args.device)
        out = check_output_dir(args.out or default_out(args.checkpoint), args.overwrite)
        report, raster = analyze(args.checkpoint, data_path=args.data, samples=args.samples,
                                 seq_len=args.seq_len, k=args.k, window=args.window, device=device,
                                 seed=args.seed, batch_size=args.batch_size, raster=args.raster,
                                 neurons=args.neurons, tokens=args.tokens)
        report = save_report(out, report, raster, overwrite=args.overwrite)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    overall = report["overall"]
    print(json.dumps({"out": out, "k": report["k"], "tokens": report["tokens"],
                      "sparsity": {c: s["sparsity"] for c, s in overall["codings"].items()},
                      "le7": overall["le7"], "loss": report["loss"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
