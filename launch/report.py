"""Run report: PNG figures for a paper and a markdown summary of a training run directory.

    python launch/report.py RUN_DIR [--out DIR] [--last 10] [--json]

Reads RUN_DIR/metrics.jsonl (a torn last line of a live run is skipped with a note),
config.yaml, the firing analyses of launch/spikes.py (RUN_DIR/analysis/*/spikes/report.json) and
long-context evaluations (RUN_DIR/eval/*.json with `loss_by_position`). Writes into DIR (default
RUN_DIR/report) report.md (steps, tokens, final and best loss, means of tokens/s and MFU over the
last rows, skipped steps, expert-load imbalance, recipe stages) and a PNG per figure the run has
data for: loss.png, lr.png, throughput.png, grad_norm.png, expert_load.png, firing_rates.png,
loss_by_position.png; report.md says which are missing and why. Safe to run while training: each
file is replaced whole. Prints a short summary (`--json`: one JSON line); errors exit with
status 1 and a message.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    from launch.cli import emit, parser

    ap = parser(__doc__)
    ap.add_argument("run_dir", metavar="RUN_DIR", help="training run directory (train.run_dir)")
    ap.add_argument("--out", default=None, metavar="DIR", help="output directory; None: RUN_DIR/report")
    ap.add_argument("--last", type=int, default=10, metavar="N",
                    help="rows over which the summary averages tokens/s and MFU")
    args = ap.parse_args(argv)

    from analysis.report import FIGURES, write_report

    try:
        result = write_report(args.run_dir, args.out, args.last)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    s, figures = result["summary"], [FIGURES[name] for name in result["figures"]]
    loss = s["final_loss"]
    emit({"out": result["out"], "report": result["report"], "figures": figures,
          "missing": {FIGURES[k]: why for k, why in result["missing"].items()},
          "steps": s["steps"], "final_loss": loss and loss[1], "notes": result["notes"]},
         [("report", result["report"]), ("steps", s["steps"]),
          ("final loss", "not logged" if loss is None else f"{loss[1]:.4f}"),
          ("figures", ", ".join(figures) or "none"),
          ("not drawn", ", ".join(FIGURES[k] for k in result["missing"]) or "none")],
         args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
