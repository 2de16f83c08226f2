"""launch/bench.py op|layer|model: the CPU-checkable parts (document packing, tables, the model
FLOP counts the scripts import, and the refusal without CUDA). The timings themselves need a GPU
and are recorded in docs/BENCHMARKS.md."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "launch"))

import bench_model  # noqa: E402
import bench_ops  # noqa: E402
from bench_util import cu_seqlens_of, document_lengths, print_table, write_json  # noqa: E402


@pytest.mark.parametrize("total, median", [(8192, 1024), (100, 1), (1000, 5000)])
def test_document_lengths_pack_exactly_and_repeat(total, median):
    lengths = document_lengths(total, median, seed=3)
    assert sum(lengths) == total and min(lengths) >= 1
    assert lengths == document_lengths(total, median, seed=3)
    cu = cu_seqlens_of(lengths, "cpu")
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == total and len(cu) == len(lengths) + 1


def test_positions_restart_at_each_document():
    pos = bench_model.positions_of([3, 1, 2])
    assert pos.tolist() == [[0, 1, 2, 0, 0, 1]]


def test_flop_counts_the_scripts_use(tmp_path):
    from model.flops import attention_pairs, block_flops, step_flops
    from pretrain import load_config

    cfg = load_config(["+model=sb7b-tiny"]).model
    lengths = [100, 28]
    assert step_flops(cfg, lengths) > sum(block_flops(cfg, i, lengths) for i in range(cfg.num_layers))
    assert bench_ops.gla_flops(lengths) > 0
    assert attention_pairs([4], None, 0) == 10 and attention_pairs([4], 1, 0) == 7


def test_table_and_json(tmp_path, capsys):
    rows = [{"op": "gla", "case": "1x8", "backend": "triton", "ms": 1.5, "tflops": 10.0},
            {"op": "gla", "case": "1x8", "backend": "fla", "ms": 3.0, "tflops": 5.0}]
    bench_ops.add_speedup(rows, "fla")
    assert rows[0]["vs_peer"] == 2.0 and rows[1]["vs_peer"] == 1.0
    print_table(rows, bench_ops.COLUMNS)
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["op", "case", "backend"] and "2.00" in out[1]
    path = tmp_path / "op.json"
    write_json(str(path), "op", {"x": 1}, rows)
    data = json.loads(path.read_text())
    assert data["mode"] == "op" and data["results"][0]["backend"] == "triton" and "torch" in data


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("mode", ["op", "layer", "model"])
def test_needs_cuda(mode):
    args = [sys.executable, os.path.join(ROOT, "launch", "bench.py"), mode]
    if mode != "op":
        args.append("+model=sb7b-tiny")
    result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0
    assert f"the {mode} benchmark needs a CUDA device" in result.stderr
