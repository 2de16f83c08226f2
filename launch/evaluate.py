"""Long-context evaluation: held-out loss by position bucket and passkey retrieval accuracy.

    python launch/evaluate.py CHECKPOINT [--data SHARDS] [--seq-len 131072] [--samples 8]
                              [--first-bucket 1024] [--passkey-lengths 8192 32768 131072]
                              [--passkey-trials 10] [--tokenizer PATH] [--device auto|cpu|cuda]
                              [--out FILE] [--overwrite] [--json]

CHECKPOINT is a training checkpoint, a run directory (its latest checkpoint) or a directory from
launch/convert.py (which needs --data). --data: token shards of held-out text made with the
model's tokenizer (launch/prepare_data.py); without it the run's own data is read: the documents its
data.val_docs split held out of training, else (no split) documents it may have trained on.
Loss is averaged over buckets of the predicted token's position, [0, 1k), [1k, 2k), ... up to
--seq-len; passkey prompts hide a 5-digit key in filler text and the answer is decoded greedily
(analysis/long_context.py). Lengths default to 128k and 8k/32k/128k, clipped to the model's
max_position_embeddings. Writes the result as JSON to FILE (default RUN_DIR/eval/step_NNNNNNNN.json,
read by launch/report.py) and prints a table (`--json`: one JSON line); errors exit with status 1.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    from launch.cli import emit, parser
    from analysis.evaluate import resolve_device

    ap = parser(__doc__)
    ap.add_argument("checkpoint", help="training checkpoint, run directory or converted directory")
    ap.add_argument("--data", default=None, help="token shard directory of held-out text made with "
                    "the model's tokenizer; None: the training run's own data")
    ap.add_argument("--seq-len", type=int, default=None,
                    help="tokens per evaluated sequence; None: 131072 clipped to the max positions")
    ap.add_argument("--samples", type=int, default=8, help="sequences whose loss is averaged")
    ap.add_argument("--first-bucket", type=int, default=1024,
                    help="positions in the first bucket; each later bucket doubles")
    ap.add_argument("--passkey-lengths", type=int, nargs="*", default=None,
                    help="passkey prompt lengths in tokens (none: no passkey); None: 8192 32768 "
                    "131072 clipped to the max positions")
    ap.add_argument("--passkey-trials", type=int, default=10, help="prompts per passkey length")
    ap.add_argument("--tokenizer", default=None, help="tokenizer of the passkey prompts; None: the "
                    "model's (its run's data, or a converted directory's tokenizer files)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the document choice and the keys")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto: CUDA when there is one")
    ap.add_argument("--out", default=None, metavar="FILE", help="output JSON; None: RUN_DIR/eval/"
                    "step_NNNNNNNN.json (a converted directory: CHECKPOINT/eval/long_context.json)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = ap.parse_args(argv)

    from analysis.long_context import check_out, default_out, evaluate_long_context, write_result

    try:
        out = check_out(args.out or default_out(args.checkpoint), args.overwrite)  # before the work
        result = evaluate_long_context(
            args.checkpoint, data_path=args.data, seq_len=args.seq_len, samples=args.samples,
            first_bucket=args.first_bucket, passkey_lengths=args.passkey_lengths,
            passkey_trials=args.passkey_trials, tokenizer=args.tokenizer,
            device=resolve_device(args.device), seed=args.seed)
        out = write_result(out, result, args.overwrite)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    data, tokens = result["data"], result["tokens_by_position"]
    emit({**result, "out": out},
         [("result", out),
          ("model", f"{result['model']}, {data['samples']} sequences of {data['seq_len']:,} tokens"
                    + (f" ({data['packed']} packed)" if data["packed"] else "")),
          *[(f"loss {bucket}", f"{loss:.4f} ({tokens[bucket]:,} tokens)")
            for bucket, loss in result["loss_by_position"].items()],
          *[(f"passkey {length}", f"{acc:.0%} of {len(result['passkey_trials'][length])}")
            for length, acc in result["passkey"].items()],
          *[("note", note) for note in result["notes"]]],
         args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
