"""Benchmarks, one per subcommand; each prints a table and writes JSON (--out).

    python launch/bench.py tokenize --mb 20 --out tokenize.json    # prepare_data tokens/s per process
    python launch/bench.py loader --tokens 64000000 --out loader.json  # loader tokens/s from memmaps
    python launch/bench.py spike --out spike.json                    # spiking kernel vs reference (CUDA)

Results are recorded in docs/BENCHMARKS.md with device, date and command.
"""
import os
import runpy
import sys

BENCHES = {"tokenize": "bench_tokenize.py", "loader": "bench_loader.py", "spike": "bench_spike.py"}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHES:
        raise SystemExit(__doc__.strip() + f"\n\nerror: choose one of {', '.join(BENCHES)}")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), BENCHES[sys.argv[1]])
    sys.argv = [script] + sys.argv[2:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
