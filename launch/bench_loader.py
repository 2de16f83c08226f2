"""Loader throughput: tokens/s one process delivers from memory-mapped tokens.

    python launch/bench_loader.py --tokens 64000000 --out loader.json
    python launch/bench_loader.py --shards /data/tok/web --seq-lens 8192      # a prepared directory

Writes synthetic documents (lengths log-normal, median ~400 tokens, mean ~660, 8..65536; random
ids of a 32k vocabulary, uint16) once under --dir: as one `.npy` array read through a memory-mapped
`ArraySource`, and as token shards read through `ShardSource`. Then times `Loader.next_batch()`
(planning, reading, packing, tensors) for each configuration: one source, a 3-source mixture
(mixed and per-domain packing), prefetching, and rank 0 of 8 data-parallel ranks (which plans
the whole global batch but reads only its eighth). The files were just written, so they are in
the page cache: this measures the loader, not the disk. Prints a table; --out writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import ArraySource, DataConfig, Loader  # noqa: E402
from data.shards import FORMAT, VERSION, ShardSource, ShardWriter, write_manifest  # noqa: E402

VOCAB = 32_000


def synthetic(directory: Path, num_tokens: int, seed: int = 0) -> tuple[Path, Path]:
    """Write ~num_tokens of synthetic documents as an array and as shards; returns both paths."""
    array_dir, shard_dir = directory / "array", directory / "shards"
    if (array_dir / "offsets.npy").exists() and (shard_dir / "manifest.json").exists():
        return array_dir, shard_dir
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(6.0, 1.0, size=num_tokens // 300), 8, 65_536).astype(np.int64)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), num_tokens) + 1]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = rng.integers(3, VOCAB, size=int(offsets[-1]), dtype=np.uint16)
    tokens[offsets[1:] - 1] = 2  # EOS ends each document
    array_dir.mkdir(parents=True, exist_ok=True)
    np.save(array_dir / "tokens.npy", tokens)
    np.save(array_dir / "offsets.npy", offsets)
    shard_dir.mkdir(parents=True, exist_ok=True)
    per_shard, entries = 50_000, []
    for index, first in enumerate(range(0, len(lengths), per_shard)):
        last = min(first + per_shard, len(lengths))
        writer = ShardWriter(shard_dir, index, np.dtype("<u2"))
        writer.append(tokens[offsets[first]:offsets[last]], lengths[first:last])
        entries.append(writer.finish())
    write_manifest(shard_dir, {
        "format": FORMAT, "version": VERSION, "complete": True, "domain": "synthetic",
        "tokenizer": {"kind": "synthetic", "path": "", "fingerprint": "synthetic",
                      "vocab_size": VOCAB, "eos_id": 2},
        "dtype": "uint16", "shards": entries, "sources": [], "request": {}, "command": None,
        "totals": {"documents": len(lengths), "tokens": int(offsets[-1]), "inputs": len(lengths)},
        "skipped": {}, "replaced": {},
    })
    return array_dir, shard_dir


def array_sources(array_dir: Path, parts: int) -> list[ArraySource]:
    """The array as `parts` sources (consecutive document ranges), memory-mapped."""
    tokens = np.load(array_dir / "tokens.npy", mmap_mode="r")
    offsets = np.load(array_dir / "offsets.npy")
    cuts = np.linspace(0, len(offsets) - 1, parts + 1).astype(int)
    out = []
    for i in range(parts):
        o = offsets[cuts[i]:cuts[i + 1] + 1]
        out.append(ArraySource(tokens[o[0]:o[-1]], o - o[0], name=f"part{i}", domain=f"d{i % 2}",
                               fingerprint="synthetic", max_token_id=VOCAB - 1))
    return out


def measure(sources, weights, *, seq_len, global_batch, dp_size=1, packing="mixed", prefetch=0,
            seconds=2.0) -> dict:
    cfg = DataConfig(seq_len=seq_len, packing=packing, prefetch=prefetch)
    loader = Loader(cfg, seed=0, global_batch=global_batch, dp_rank=0, dp_size=dp_size,
                    sources=sources, weights=weights)
    loader.next_batch()  # warm-up: first permutation chunks, thread start
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = loader.next_batch()
        steps += 1
    elapsed = time.perf_counter() - start
    loader.close()
    local = batch["input_ids"].numel()
    return {"steps": steps, "seconds": elapsed, "tokens_per_s": steps * local / elapsed,
            "ms_per_step": 1000 * elapsed / steps, "local_tokens_per_step": local,
            "global_tokens_per_step": global_batch * seq_len}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--tokens", type=int, default=64_000_000, help="synthetic tokens to write")
    p.add_argument("--dir", default="", help="where to write them (default: a temporary folder)")
    p.add_argument("--shards", default="", help="bench this prepared directory instead")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--tokens-per-step", type=int, default=131_072, help="global batch x seq_len")
    p.add_argument("--seconds", type=float, default=2.0, help="timed per configuration")
    p.add_argument("--out", default="", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)

    with tempfile.TemporaryDirectory(dir=args.dir or None) as tmp:
        if args.shards:
            cases = {"shards": lambda k: [ShardSource(args.shards)]}
        else:
            t0 = time.perf_counter()
            array_dir, shard_dir = synthetic(Path(args.dir or tmp), args.tokens)
            print(f"synthetic data: {args.tokens:,} tokens in {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr)
            cases = {"array": lambda k: array_sources(array_dir, k),
                     "shards": lambda k: [ShardSource(shard_dir)]}
        rows = []
        for seq_len in args.seq_lens:
            gb = max(1, args.tokens_per_step // seq_len)
            configs = [(name, 1, "mixed", 0, 1) for name in cases]
            if "array" in cases:
                configs += [("array", 3, "mixed", 0, 1), ("array", 3, "domain", 0, 1),
                            ("array", 1, "mixed", 2, 1), ("array", 1, "mixed", 0, 8)]
            for name, parts, packing, prefetch, dp in configs:
                sources = cases[name](parts)
                r = measure(sources, [0.5, 0.3, 0.2][:parts] if parts > 1 else None,
                            seq_len=seq_len, global_batch=gb * dp if dp > 1 else gb, dp_size=dp,
                            packing=packing, prefetch=prefetch, seconds=args.seconds)
                r.update(source=name, sources=parts, packing=packing, prefetch=prefetch, dp=dp,
                         seq_len=seq_len, global_batch=gb * dp if dp > 1 else gb)
                rows.append(r)
                print(f"{name:7s} x{parts} {packing:6s} prefetch {prefetch} dp {dp}  L={seq_len:5d} "
                      f"{r['tokens_per_s'] / 1e6:8.1f} M tokens/s", file=sys.stderr)

    header = f"{'source':8s} {'n':>2s} {'packing':7s} {'pf':>2s} {'dp':>3s} {'seq_len':>7s} " \
             f"{'batch':>5s} {'ms/step':>8s} {'M tok/s':>8s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['source']:8s} {r['sources']:2d} {r['packing']:7s} {r['prefetch']:2d} {r['dp']:3d} "
              f"{r['seq_len']:7d} {r['global_batch'] // r['dp']:5d} {r['ms_per_step']:8.2f} "
              f"{r['tokens_per_s'] / 1e6:8.1f}")
    print("(tokens/s counts the tokens this rank receives; dp 8 = rank 0 of 8, planning the whole "
          "global batch)")
    if args.out:
        meta = {"python": platform.python_version(), "numpy": np.__version__,
                "machine": platform.machine(), "cpus": os.cpu_count(), "tokens": args.tokens,
                "tokens_per_step": args.tokens_per_step, "shards": args.shards or None}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
