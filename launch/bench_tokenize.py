"""Tokenization throughput of the prepare pipeline (text -> token shards), per process.

    python launch/bench_tokenize.py --mb 20 --num-proc 1 2 --out bench_tokenize.json

Corpus (`--corpus`): English prose (the demo corpus: standard-library docstrings and the
language reference) or code (the standard library's sources), cycled to `--mb` MB of one jsonl
file. Tokenizer: the demo setup, a sentencepiece model (vocab `--vocab`, default the demo's 2048)
trained on the demo corpus, or `--tokenizer PATH`. Rows: the tokenizer's own `encode_batch` on
one thread, texts already in memory (the ceiling); then for each `--num-proc` a full
`prepare_shards` run (read, tokenize, write, fsync) into a fresh directory, after a small warm-up
run so that one-time imports are not counted. Each is run `--repeat` times and the fastest
reported (a shared machine is noisy). Every process tokenizes on one thread;
tokens/s per process = tokens/s / worker processes.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def build_corpus(path: Path, megabytes: float, kind: str) -> tuple[int, int]:
    """Write ~`megabytes` MB of jsonl documents of `kind` to `path`; returns (documents, chars).

    prose: the demo corpus (docstrings and the language reference), cycled;
    code:  the standard library's source files, cycled.
    """
    from data.demo import demo_documents, stdlib_root, stdlib_sources

    def sources():
        for p in stdlib_sources(stdlib_root()):
            try:
                text = p.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if text.strip():
                yield text

    base = list(demo_documents(10**9) if kind == "prose" else sources())
    limit, size, docs, chars = megabytes * 1e6, 0, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        for text in itertools.cycle(base):
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            f.write(line)
            size, docs, chars = size + len(line.encode()), docs + 1, chars + len(text)
            if size >= limit:
                break
    return docs, chars


def encode_ceiling(tokenizer_path: str, corpus: Path, eos, repeat: int) -> dict:
    """The tokenizer alone, one thread, on the whole corpus already in memory (best of `repeat`)."""
    from data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path, num_threads=1, eos=eos)
    texts = [json.loads(line)["text"] for line in corpus.open(encoding="utf-8")]
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        tokens = sum(len(ids) for i in range(0, len(texts), 256)
                     for ids in tok.encode_batch(texts[i:i + 256], add_eos=True))
        times.append(time.perf_counter() - t0)
    seconds = min(times)
    return {"mode": "encode_batch only", "num_proc": 1, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "tokens_per_s_per_proc": tokens / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=20.0, help="corpus size in MB of jsonl")
    p.add_argument("--corpus", choices=("prose", "code"), default="prose")
    p.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: train the demo one)")
    p.add_argument("--eos", default=None, help="EOS of a Hugging Face tokenizer")
    p.add_argument("--vocab", type=int, default=2048, help="vocabulary of the trained demo tokenizer")
    p.add_argument("--repeat", type=int, default=3, help="runs of each; the fastest is reported "
                   "(the machine may be shared)")
    p.add_argument("--docs-per-shard", type=int, default=100_000)
    p.add_argument("--workdir", default=None, help="where corpus and shards go (default: a temp dir)")
    p.add_argument("--out", required=True, help="JSON results file")
    args = p.parse_args()
    # one thread per process everywhere (a Hugging Face tokenizer would otherwise use every core
    # when num_proc is 1), so that tokens/s per process means what it says
    os.environ["TOKENIZERS_PARALLELISM"] = "false"

    from data.demo import demo_documents
    from data.prepare import prepare_shards
    from data.tokenizer import train_sentencepiece

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_tokenize-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    docs, chars = build_corpus(corpus, args.mb, args.corpus)
    tokenizer = args.tokenizer
    if tokenizer is None:
        tokenizer = str(train_sentencepiece(demo_documents(2_000_000), args.vocab, work / "tokenizer.model").path)
    rows = [encode_ceiling(tokenizer, corpus, args.eos, args.repeat)]
    warm = work / "warmup.jsonl"
    warm.write_text(corpus.open(encoding="utf-8").readline())
    prepare_shards([str(warm)], work / "warmup", tokenizer=tokenizer, eos=args.eos, overwrite=True,
                   progress=False)
    for n in args.num_proc:
        runs = []
        for _ in range(args.repeat):
            runs.append(prepare_shards([str(corpus)], work / f"shards-np{n}", tokenizer=tokenizer, eos=args.eos,
                                       num_proc=n, docs_per_shard=args.docs_per_shard, overwrite=True,
                                       progress=False))
        r = min(runs, key=lambda r: r.seconds)
        rows.append({"mode": "prepare_shards", "num_proc": n, "tokens": r.tokens, "seconds": r.seconds,
                     "seconds_all": [x.seconds for x in runs],
                     "tokens_per_s": r.tokens / r.seconds, "tokens_per_s_per_proc": r.tokens / r.seconds / n,
                     "docs_per_s": r.documents / r.seconds, "mb_per_s": corpus.stat().st_size / 1e6 / r.seconds})
    result = {"bench": "tokenize", "corpus": {"kind": args.corpus, "path": str(corpus),
                                              "bytes": corpus.stat().st_size,
                                              "documents": docs, "characters": chars},
              "tokenizer": tokenizer, "cpus": os.cpu_count(), "python": platform.python_version(),
              "machine": platform.machine(), "rows": rows}
    print(f"{args.corpus} corpus {corpus.stat().st_size / 1e6:.1f} MB, {docs} documents, {chars / 1e6:.1f}M chars; "
          f"tokenizer {tokenizer}; {os.cpu_count()} CPUs")
    print(f"{'mode':<18} {'procs':>5} {'tokens':>11} {'seconds':>8} {'tokens/s':>11} {'tok/s/proc':>11}")
    for r in rows:
        print(f"{r['mode']:<18} {r['num_proc']:>5} {r['tokens']:>11,} {r['seconds']:>8.2f} "
              f"{r['tokens_per_s']:>11,.0f} {r['tokens_per_s_per_proc']:>11,.0f}")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
