"""Benchmarks, one per subcommand; each prints a table and writes JSON (--out).

    python launch/bench.py tokenize --mb 20 --out tokenize.json    # prepare_data tokens/s per process
    python launch/bench.py loader --tokens 64000000 --out loader.json  # loader tokens/s from memmaps
    python launch/bench.py spike --out spike.json                    # spiking kernel vs reference (CUDA)
    python launch/bench.py op --ops gla attention loss --out op.json  # kernels vs their peers (CUDA)
    python launch/bench.py layer +model=sb7b --seq 8192 --out layer.json     # one block of each kind
    python launch/bench.py model +model=sb7b model.num_layers=4 --seq 8192 32768 --out model.json

Results are recorded in docs/BENCHMARKS.md with device, date and command.
"""
import os
import runpy
import sys

BENCHES = {"tokenize": "bench_tokenize.py", "loader": "bench_loader.py", "spike": "bench_spike.py",
           "op": "bench_ops.py", "layer": "bench_model.py", "model": "bench_model.py"}
WITH_MODE = ("layer", "model")  # one script serves both; it reads the mode from its first argument


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHES:
        raise SystemExit(__doc__.strip() + f"\n\nerror: choose one of {', '.join(BENCHES)}")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), BENCHES[sys.argv[1]])
    sys.argv = [script] + sys.argv[1 if sys.argv[1] in WITH_MODE else 2:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
