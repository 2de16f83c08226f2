"""Tokenize text corpora into token shards (format: data/shards.py).

    python launch/prepare_data.py --input corpus/ --input extra.jsonl --tokenizer qwen2.5-7b/ \\
        --output data/web --num-proc 8 --domain web
    python launch/prepare_data.py --input 'books/**/*.txt' --train-tokenizer 32000 --output data/books

Re-running the same command resumes after the last finished shard (or does nothing if all are
done); other inputs or settings into an existing directory are refused unless --overwrite.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str]) -> argparse.Namespace:
    from data.prepare import DOCS_PER_SHARD
    from data.text_sources import FORMATS, INVALID_UTF8, TEXT_MODES

    p = argparse.ArgumentParser(prog="prepare_data.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--input", action="append", required=True, metavar="PATH_GLOB_OR_NAME",
                   help="file, folder, glob or Hugging Face dataset name[:config] (hf: forces the hub); "
                        "repeat for several")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", metavar="PATH",
                     help="sentencepiece .model, or tokenizer.json / a checkpoint folder holding it")
    tok.add_argument("--train-tokenizer", type=int, metavar="VOCAB",
                     help="train a sentencepiece model of this vocabulary size on the input first")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--text-field", default="text", help="field holding the text (json, parquet, arrow, hub)")
    p.add_argument("--text-mode", choices=TEXT_MODES, default="document",
                   help="plain text: one document per file, blank-line-separated paragraph, or line")
    p.add_argument("--format", choices=FORMATS, default=None, help="format of all local files "
                   "(default: by extension)")
    p.add_argument("--split", default="train", help="split of hub datasets")
    p.add_argument("--eos", default=None, help="EOS token of a Hugging Face tokenizer (default: its config)")
    p.add_argument("--num-proc", type=int, default=1, help="tokenizer worker processes")
    p.add_argument("--docs-per-shard", type=int, default=DOCS_PER_SHARD, help="input records per shard")
    p.add_argument("--domain", default="default", help="domain tag of these documents")
    p.add_argument("--invalid-utf8", choices=INVALID_UTF8, default="replace",
                   help="texts with bytes that are not UTF-8: replace them with U+FFFD or skip the text")
    p.add_argument("--overwrite", action="store_true", help="discard the prepared data in --output and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from data.prepare import prepare_shards

    command = [os.path.basename(sys.executable), sys.argv[0], *argv]
    try:
        r = prepare_shards(
            args.input, args.output, tokenizer=args.tokenizer, train_vocab=args.train_tokenizer,
            eos=args.eos, text_field=args.text_field, text_mode=args.text_mode, input_format=args.format,
            split=args.split, invalid_utf8=args.invalid_utf8, domain=args.domain,
            docs_per_shard=args.docs_per_shard, num_proc=args.num_proc, overwrite=args.overwrite,
            progress=not args.quiet, command=command)
    except (ValueError, OSError) as e:  # bad input or settings: the message says it
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished shards are kept in {args.output}; run the same command "
              f"again to resume", file=sys.stderr)
        return 130
    m = r.manifest
    rate = r.seconds if r.seconds > 0 else float("nan")
    print(f"{r.directory}: {len(m['shards'])} shards ({r.new_shards} new, {r.reused_shards} already "
          f"done), {m['totals']['documents']:,} documents, {m['totals']['tokens']:,} tokens, "
          f"{m['dtype']}, domain {m['domain']!r}")
    print(f"tokenizer: {m['tokenizer']['kind']} {m['tokenizer']['path']} (vocab {m['tokenizer']['vocab_size']}, "
          f"eos {m['tokenizer']['eos_id']}, fingerprint {m['tokenizer']['fingerprint'][:16]})")
    print(f"skipped inputs: {m['skipped'] or 'none'}; invalid UTF-8 replaced: "
          f"{m['replaced'].get('invalid_utf8', 0)}")
    print(f"this run: {r.documents:,} documents, {r.tokens:,} tokens in {r.seconds:.1f} s "
          f"({r.documents / rate:,.0f} docs/s, {r.tokens / rate:,.0f} tokens/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
