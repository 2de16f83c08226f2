"""Convert a Qwen-style Hugging Face checkpoint into SpikingBrain-7B or -76B (streaming).

    python launch/convert.py SRC DST --target sb7b|sb76b|sb7b-tiny|sb76b-tiny [--dtype bf16|fp32]
                             [--overwrite] [--max-shard-size 5GB] [--sliding-window N] [--seed 0]
    python launch/convert.py --export CHECKPOINT_OR_RUN_DIR DST [--dtype bf16|fp32] [--overwrite]

The target's dims come from SRC's config.json; its layer plan and GLA/MoE/hybrid settings from
conf/model/TARGET.yaml. DST is written under a temporary sibling name and renamed when complete.
--export writes a training checkpoint (train/checkpoint.py; a run directory means its latest one)
in the same layout, bf16 by default. Prints a short summary (with peak RSS; `--json`: one JSON
line) on success; errors exit with status 1 and a message.
"""
from __future__ import annotations

import os
import resource
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def template(target: str):
    import yaml

    from train.config import from_dict
    from model.config import ModelConfig

    with open(os.path.join(ROOT, "conf", "model", f"{target}.yaml")) as f:
        return from_dict(ModelConfig, yaml.safe_load(f), "model")


def main(argv=None) -> int:
    from launch.cli import emit, megabytes, parser

    ap = parser(__doc__)
    ap.add_argument("src", help="Qwen2 Hugging Face directory (config.json + safetensors or .bin)")
    ap.add_argument("dst", help="output directory (must not exist unless --overwrite)")
    targets = sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, "conf", "model"))
                     if f.endswith(".yaml") and f.startswith("sb"))
    ap.add_argument("--export", action="store_true",
                    help="SRC is a training checkpoint (or a run directory: its latest checkpoint); "
                         "write it to DST in the same Hugging Face-style layout")
    ap.add_argument("--target", choices=targets,
                    help="model config whose layer plan and settings the result takes (its dims come "
                         "from SRC); -tiny targets keep the tiny configs' plans, so +model=NAME-tiny "
                         "trains the result; required unless --export")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="dtype of DST's tensors")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    ap.add_argument("--max-shard-size", default="5GB", help="largest safetensors file of DST")
    ap.add_argument("--sliding-window", type=int, default=None,
                    help="SWA window; None: the target config's (4096 in sb7b)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the new parameters")
    args = ap.parse_args(argv)

    import torch

    from model.convert import convert
    from model.hf.checkpoint import parse_size

    if not args.export and args.target is None:
        ap.error("--target is required (or --export to export a training checkpoint)")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    try:
        parse_size(args.max_shard_size)
        if args.export:
            from train.export import export_checkpoint

            summary = export_checkpoint(args.src, args.dst, dtype=dtype, overwrite=args.overwrite,
                                        max_shard_size=args.max_shard_size)
        else:
            summary = convert(args.src, args.dst, template(args.target), args.target, dtype=dtype,
                              overwrite=args.overwrite, max_shard_size=args.max_shard_size,
                              sliding_window=args.sliding_window, seed=args.seed)
            summary.pop("mixers"), summary.pop("ffns")
            summary = {"converted": os.path.abspath(args.dst), **summary}
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    summary["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    head = ([("exported", f"{summary['checkpoint']} -> {summary['exported']}"), ("model", summary["model"])]
            if args.export else
            [("converted", f"{os.path.abspath(args.src)} -> {summary['converted']}"),
             ("target", f"{summary['target']}, {summary['layers']} layers, in {summary['seconds']:.1f} s"),
             ("tokenizer files", ", ".join(summary["tokenizer_files"]) or "none in SRC")])
    emit(summary, head + [
        ("tensors", f"{summary['tensors']}, {megabytes(summary['bytes'])} {summary['dtype']}"),
        ("peak RSS", f"{summary['peak_rss_mb']:,.1f} MB"),
    ], args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
