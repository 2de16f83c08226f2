"""launch/report.py and analysis.report: valid PNG figures, and report.md numbers equal to what
metrics.jsonl holds, on a real tiny MoE run and on synthetic run directories (recipe stages,
validation loss, skipped steps, evaluations, torn and damaged lines, missing fields)."""
import json
import math
import os
import re

import numpy as np
import pytest
from matplotlib.image import imread

from analysis.report import FIGURES, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def report_cli(*args):
    from launch.report import main

    return main([str(a) for a in args])


def check_png(path):
    """A PNG file that decodes to a picture with content (not one flat colour)."""
    with open(path, "rb") as f:
        assert f.read(8) == PNG, path
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500, (path, image.shape)
    assert image[..., :3].std() > 0.05, path


def table(md: str) -> dict:
    """report.md's summary table: {quantity: value text}."""
    rows = re.findall(r"^\| (.+?) \| (.+?) \|$", md, re.M)
    return {k: v for k, v in rows if k not in ("quantity", "---")}


def value(text: str) -> float:
    """The first number of a table cell ('1,024', '6.8480 (step 4)', '12.50% (mean ...)')."""
    return float(re.match(r"[-\d,.e+]+", text).group().replace(",", ""))


def step_of(text: str) -> int:
    return int(re.search(r"\(step (\d+)\)", text).group(1))


def rows_of(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


# --------------------------------------------------------------------------- a real tiny run


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    """sb76b-tiny trained 6 steps, a row per step (expert load included), with a firing
    analysis of its last checkpoint where launch/spikes.py puts it."""
    from data.config import DataConfig
    from tests.helpers import model_config
    from train import RunConfig, run
    from train.config import TrainConfig
    from analysis.spike_report import analyze, default_out, save_report

    root = tmp_path_factory.mktemp("moe_run")
    run_dir = str(root / "run")
    data = DataConfig(seq_len=64, demo_chars=200_000, vocab_size=512, cache_dir=str(root / "cache"))
    train = TrainConfig(max_steps=6, global_batch=4, lr=3e-3, warmup_steps=2, log_every=1,
                        run_dir=run_dir, seed=7)
    run(RunConfig(model=model_config("sb76b-tiny"), data=data, train=train))
    out = default_out(run_dir)
    os.makedirs(os.path.dirname(out))
    save_report(out, *analyze(run_dir, samples=2, batch_size=2, seq_len=32))
    return run_dir


def test_cli_on_a_real_run_writes_valid_figures_and_the_metrics_numbers(moe_run, capsys):
    assert report_cli(moe_run, "--last", "3", "--json") == 0
    printed = json.loads(capsys.readouterr().out)
    out = os.path.join(moe_run, "report")
    drawn = ["loss.png", "lr.png", "throughput.png", "grad_norm.png", "expert_load.png",
             "firing_rates.png"]
    assert printed["out"] == out and printed["figures"] == drawn
    assert list(printed["missing"]) == ["loss_by_position.png"]
    assert sorted(os.listdir(out)) == sorted(drawn + ["report.md"])  # no temporary left behind
    for name in drawn:
        check_png(os.path.join(out, name))

    rows = rows_of(moe_run)
    md = open(os.path.join(out, "report.md")).read()
    t = table(md)
    assert value(t["steps"]) == rows[-1]["step"] == 6
    assert value(t["tokens"]) == rows[-1]["tokens"] == 6 * 4 * 64
    assert value(t["final loss"]) == pytest.approx(rows[-1]["loss"], abs=1e-4)
    best = min(rows, key=lambda r: r["loss"])
    assert value(t["best loss"]) == pytest.approx(best["loss"], abs=1e-4)
    assert step_of(t["best loss"]) == best["step"]
    tps = [r["tokens_per_s"] for r in rows[-3:]]
    assert value(t["tokens/s"]) == pytest.approx(sum(tps) / 3, abs=0.05)
    assert "last 3 rows" in t["tokens/s"]
    flops = [r["tflops_per_gpu"] for r in rows[-3:]]
    assert value(t["model TFLOP/s per GPU"]) == pytest.approx(sum(flops) / 3, rel=1e-3)
    assert t["MFU"] == "not logged"  # no known peak on a CPU
    assert value(t["skipped steps"]) == rows[-1]["skipped_steps"] == 0
    worst = max(rows, key=lambda r: r["expert_load_max"])
    key = "max expert-load imbalance (busiest expert / mean)"
    assert value(t[key]) == pytest.approx(worst["expert_load_max"], abs=1e-4)
    assert step_of(t[key]) == worst["step"]
    assert "Model `sb76b-tiny`" in md
    for name in drawn:
        assert f"({name})" in md
    assert "loss_by_position.png): no evaluation" in md


def test_drawn_data_equals_the_run_files(moe_run, tmp_path):
    result = write_report(moe_run, str(tmp_path / "report"))
    rows = rows_of(moe_run)
    figs = result["figures"]
    assert figs["loss"]["loss"] == ([r["tokens"] for r in rows], [r["loss"] for r in rows])
    assert figs["lr"]["lr"][1] == [r["lr"] for r in rows]
    load = figs["expert_load"]
    assert load["steps"] == [r["step"] for r in rows]
    assert load["layers"] == [1, 3]  # sb76b-tiny: dense FFN at layers 0 and 2
    expected = np.array([r["expert_load"] for r in rows]) * 4  # [rows, L, E], 4 experts
    np.testing.assert_allclose(load["image"], expected.reshape(len(rows), 8).T)
    np.testing.assert_allclose(load["worst"], [r["expert_load_max"] for r in rows], atol=1e-4)
    spikes = json.load(open(os.path.join(moe_run, "analysis", "step_00000006", "spikes", "report.json")))
    ((label, layers, rates),) = figs["firing"]["reports"]
    assert label == "step 6" and layers == [e["layer"] for e in spikes["layers"]]
    assert rates["ternary"] == [e["codings"]["ternary"]["firing_rate"] for e in spikes["layers"]]


# --------------------------------------------------------------------------- synthetic runs


def write_rows(run_dir, rows, tail=""):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows) + tail)


def staged_rows():
    """Ten rows over three recipe stages (8k: 1k tokens a step, 32k: 2k, 128k: 4k), validation
    loss at each stage's end, MFU, two skipped steps in step 6's window and one in step 9's."""
    rows, tokens, skipped = [], 0, 0
    for step in range(1, 11):
        stage = "8k" if step <= 4 else "32k" if step <= 7 else "128k"
        tokens += {"8k": 1000, "32k": 2000, "128k": 4000}[stage]
        skipped += {6: 2, 9: 1}.get(step, 0)
        row = {"step": step, "stage": stage, "loss": 6 - 0.3 * step, "lr": 1e-3 / step,
               "grad_norm": 2.0 / step, "tokens": tokens, "tokens_per_s": 1000.0 + 10 * step,
               "mfu": 0.3 + 0.01 * step, "skipped_steps": skipped}
        if step in (4, 7, 10):
            row["val_loss"] = 6.1 - 0.3 * step
        rows.append(row)
    rows[5].update(loss=math.nan, grad_norm=math.inf)  # every step of the window was skipped
    return rows


@pytest.fixture
def staged_run(tmp_path):
    run_dir = str(tmp_path / "run")
    rows = staged_rows()
    # a damaged line in the middle and a torn last line (the run was writing it)
    write_rows(run_dir, rows[:3], "not json\n" + "".join(json.dumps(r) + "\n" for r in rows[3:])
               + '{"step": 11, "loss": 2.')
    os.makedirs(os.path.join(run_dir, "eval"))
    evals = {"stage_8k": {"1-2k": 3.0, "2-4k": 2.8, "4-8k": 2.7},
             "stage_32k": {"1-2k": 2.9, "2-4k": 2.7, "4-8k": 2.6, "8-16k": 2.5, "16-32k": 2.45}}
    for name, losses in evals.items():
        with open(os.path.join(run_dir, "eval", f"{name}.json"), "w") as f:
            json.dump({"step": 4, "loss_by_position": losses, "passkey": {"8k": 1.0}}, f)
    with open(os.path.join(run_dir, "eval", "broken.json"), "w") as f:
        f.write('{"loss_by_pos')
    return run_dir, rows, evals


def test_stages_validation_skips_and_evaluations(staged_run):
    run_dir, rows, evals = staged_run
    result = write_report(run_dir, last=4)
    figs, summary = result["figures"], result["summary"]
    assert set(figs) == set(FIGURES) - {"expert_load", "firing"}
    for name in figs:
        check_png(os.path.join(result["out"], FIGURES[name]))
    # stage boundaries where the previous stage's last row is: by tokens on the loss figure,
    # by step on the others
    assert figs["loss"]["boundaries"] == [4000, 10000]
    for name in ("lr", "throughput", "grad_norm"):
        assert figs[name]["boundaries"] == [4, 7], name
    assert [s["stage"] for s in summary["stages"]] == ["8k", "32k", "128k"]
    val = [r for r in rows if "val_loss" in r]
    assert figs["loss"]["val_loss"] == ([r["tokens"] for r in val], [r["val_loss"] for r in val])
    assert rows[5]["tokens"] not in figs["loss"]["loss"][0]  # step 6: NaN loss, inf grad norm
    assert 6 not in figs["grad_norm"]["grad_norm"][0] and len(figs["grad_norm"]["grad_norm"][0]) == 9
    assert figs["grad_norm"]["skipped"] == [(6, 2), (9, 1)]
    assert figs["throughput"]["efficiency"][0] == "mfu"
    assert figs["loss_by_position"]["buckets"] == ["1-2k", "2-4k", "4-8k", "8-16k", "16-32k"]
    assert figs["loss_by_position"]["evals"] == sorted(evals.items())

    t = table(open(result["report"]).read())
    assert value(t["steps"]) == 10 and value(t["tokens"]) == 22000
    assert value(t["final loss"]) == pytest.approx(rows[-1]["loss"], abs=1e-4)
    assert step_of(t["best loss"]) == 10
    assert value(t["final validation loss"]) == pytest.approx(val[-1]["val_loss"], abs=1e-4)
    assert step_of(t["best validation loss"]) == 10
    mfu = [r["mfu"] for r in rows[-4:]]
    assert value(t["MFU"]) == pytest.approx(100 * sum(mfu) / 4, abs=0.005)
    assert value(t["tokens/s"]) == pytest.approx(sum(r["tokens_per_s"] for r in rows[-4:]) / 4)
    assert value(t["skipped steps"]) == 3
    md = open(result["report"]).read()
    assert "| 8k | 1-4 | 0 |\n| 32k | 5-7 | 4,000 |\n| 128k | 8-10 | 10,000 |" in md
    notes = "\n".join(result["notes"])
    assert "line 4: skipped, not a metrics row" in notes
    assert "line 12: skipped a torn last line" in notes
    assert "eval/broken.json: skipped, unreadable" in notes
    for note in result["notes"]:
        assert note in md


def test_missing_fields_skip_figures_and_say_why(tmp_path):
    run_dir = str(tmp_path / "run")
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5, "tokens": None, "lr": "0.1"},
            {"step": 3, "expert_load": [[0.5, 0.5], [1.0]]}, {"step": 4, "expert_load": "x"}]
    write_rows(run_dir, rows)
    out = tmp_path / "report"
    out.mkdir()
    (out / "loss.png").write_bytes(PNG)  # an earlier report's figure, no longer drawn
    result = write_report(run_dir, str(out))
    assert result["figures"] == {} and set(result["missing"]) == set(FIGURES)
    assert os.listdir(out) == ["report.md"]
    t = table(open(result["report"]).read())
    assert value(t["steps"]) == 4 and step_of(t["final loss"]) == 2 and value(t["final loss"]) == 2.5
    for key in ("tokens", "tokens/s", "MFU", "skipped steps", "final validation loss"):
        assert t[key] == "not logged", key
    md = open(result["report"]).read()
    assert "no row has a finite `loss` and `tokens`" in md and "config.yaml: missing" in md


def test_expert_load_keeps_the_rows_of_the_latest_shape(tmp_path):
    run_dir = str(tmp_path / "run")
    rows = [{"step": 1, "expert_load": [[0.5, 0.5, 0.0]]}, {"step": 2, "expert_load": [[1.0], [0.2]]},
            {"step": 3, "expert_load": [[0.25, 0.75], [0.5, 0.5]], "expert_load_max": 1.5},
            {"step": 4, "expert_load": [[0.5, 0.5], [0.9, 0.1]], "expert_load_max": 1.8}]
    write_rows(run_dir, rows)
    result = write_report(run_dir)
    load = result["figures"]["expert_load"]
    assert load["steps"] == [3, 4] and load["layers"] == [0, 1]
    notes = "\n".join(result["notes"])
    assert "left out 2 row(s) not of the last rows' 2 layers x 2 experts (steps 1..2)" in notes
    np.testing.assert_allclose(load["image"], [[0.5, 1.0], [1.5, 1.0], [1.0, 1.8], [1.0, 0.2]])


def test_cli_errors_name_the_path(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert report_cli(missing) == 1
    assert f"{missing}: no such run directory" in capsys.readouterr().err
    assert report_cli(tmp_path) == 1
    assert f"{tmp_path / 'metrics.jsonl'}: not found" in capsys.readouterr().err
    write_rows(str(tmp_path), [], '{"step": 1, "lo')
    assert report_cli(tmp_path) == 1
    assert f"{tmp_path / 'metrics.jsonl'} holds no metrics rows yet" in capsys.readouterr().err
    assert report_cli(tmp_path, "--last", "0") == 1
    assert "--last must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report_cli("--help")
    assert "RUN_DIR/report" in capsys.readouterr().out
