"""launch/spikes.py: writes report.json and the figures atomically, refuses to overwrite, and
names the path or option at fault."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT

SCRIPT = os.path.join(ROOT, "launch", "spikes.py")
SMALL = ["--samples", "2", "--seq-len", "32", "--neurons", "8", "--tokens", "4"]
FIGURES = ["count_histogram.png", "layers.png", "raster_binary.png", "raster_bitwise.png",
           "raster_ternary.png", "raster_twos_complement.png"]
PNG = b"\x89PNG\r\n\x1a\n"


def spikes(*args):
    from launch.spikes import main

    return main([str(a) for a in args])


def test_writes_report_and_figures(tiny_run, tmp_path, capsys):
    out = tmp_path / "spikes"
    assert spikes(tiny_run, "--out", out, "--k", "4", "--json", *SMALL) == 0
    summary = json.loads(capsys.readouterr().out.strip())
    assert summary["out"] == str(out) and summary["k"] == 4.0
    assert set(summary["sparsity"]) == {"binary", "ternary", "bitwise", "twos_complement"}
    assert 0 <= summary["le7"] <= 1 and set(summary["loss"]) == {"float", "spiking", "delta"}
    assert sorted(os.listdir(out)) == sorted(FIGURES + ["report.json"])
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data[:8] == PNG and len(data) > 1000
    report = json.loads((out / "report.json").read_text())
    assert report["figures"] == FIGURES and report["samples"] == 2 and report["tokens"] == 64
    assert report["data"]["source"] == "training run"
    assert not [p for p in os.listdir(tmp_path) if p != "spikes"]  # no temporary left behind

    # An existing report is refused before any work, and replaced only with --overwrite.
    assert spikes(tiny_run, "--out", out, *SMALL) == 1
    err = capsys.readouterr().err
    assert f"error: {out} already exists" in err and "--overwrite" in err
    assert spikes(tiny_run, "--out", out, "--overwrite", "--raster", "layers.1.mlp.up_proj", *SMALL) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["raster"]["capture"] == "layers.1.mlp.gate_proj" and report["k"] == 3.0


def test_default_out_is_in_the_run_dir_outside_the_checkpoints(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)  # keep the shared run untouched
    assert spikes(run, "--json", *SMALL) == 0
    out = json.loads(capsys.readouterr().out)["out"]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert out == str(run / "analysis" / latest / "spikes")  # pruning the checkpoint keeps it
    assert os.path.isfile(os.path.join(out, "report.json"))


def test_a_failed_run_leaves_nothing(tiny_run, tmp_path, capsys):
    out = tmp_path / "spikes"
    assert spikes(tiny_run, "--out", out, "--raster", "layers.9.attn.q_proj", *SMALL) == 1
    assert "--raster layers.9.attn.q_proj" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("args, message", [
    (["{tmp}/missing"], "{tmp}/missing"),
    (["{run}", "--data", "{tmp}"], "--data {tmp}: not a token shard directory"),
    (["{run}", "--k", "-1"], "--k must be a positive number"),
    (["{run}", "--raster", "layers.0.attn.x_proj"], "--raster layers.0.attn.x_proj"),
])
def test_errors_name_the_path_or_option(tiny_run, tmp_path, capsys, args, message):
    fill = dict(tmp=tmp_path, run=tiny_run)
    out = tmp_path / "out"
    assert spikes(*[a.format(**fill) for a in args], "--out", out, *SMALL) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message.format(**fill) in err
    assert not out.exists()


def test_script_runs_from_anywhere(tmp_path):
    r = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "nothing")], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 1
    assert str(tmp_path / "nothing") in r.stderr and "Traceback" not in r.stderr
