"""The report of a run directory: PNG figures and a markdown summary (`launch/report.py`).

    summary = write_report(run_dir, out_dir)   # out_dir/report.md and the figures

What is read; everything but `metrics.jsonl` is optional, and data a run lacks skips its figure,
which report.md says:
- `metrics.jsonl` (`train.metrics`): one JSON object per logged row with an integer `step`. The
  other fields are used where present and finite: `loss`, `val_loss`, `lr`, `grad_norm`,
  `tokens` (consumed so far), `tokens_per_s`, `mfu`, `tflops_per_gpu`, `skipped_steps` (so far),
  `peak_mem_gib`, `expert_load` ([MoE layer][expert] shares of the window's routed tokens),
  `expert_load_max`, `balance_loss`, `firing_rate` ({spike target: share of spike counts != 0}
  in training, `train/observe.py`), and `stage` (a recipe stage's name; where it changes, the figures draw a
  boundary). A torn last line (the run is writing it, or stopped mid-append) and damaged lines
  are skipped with a note: the report runs on a live run's files.
- `config.yaml`: the model's name, and which layers are MoE (the heatmap's labels).
- `analysis/*/spikes/report.json` (`launch/spikes.py`): firing rate by layer for every coding.
- `eval/*.json`: `loss_by_position` {bucket: loss}, buckets in order (the long-context evaluation).

A recipe run directory (`RUN_DIR/recipe.json`, `train.recipe`) reads every stage's directory
`stages/NN-NAME` in order: the rows one after the other, steps counted on across stages, each
row's `stage` the stage's name; the evaluations and firing analyses of every stage; the config of
the latest stage begun.

Files are written in place, each atomically; a figure the run no longer has data for is removed.
"""
from __future__ import annotations

import glob
import json
import math
import os

import numpy as np
import yaml

from model.config import LayerPlan
from train.recipe import RECIPE_FILE as RECIPE, STAGES_DIR as STAGES
from . import report_figures as figs

METRICS = "metrics.jsonl"
REPORT = "report.md"
FIGURES = {"loss": "loss.png", "lr": "lr.png", "throughput": "throughput.png",
           "grad_norm": "grad_norm.png", "expert_load": "expert_load.png",
           "firing": "firing_rates.png", "loss_by_position": "loss_by_position.png"}
TITLES = {"loss": "Loss and validation loss", "lr": "Learning rate",
          "throughput": "Throughput and MFU", "grad_norm": "Gradient norm and skipped steps",
          "expert_load": "Expert load", "firing": "Firing rates", "loss_by_position": "Loss by position"}


def number(value) -> float | None:
    """`value` as a float when it is a finite number (not a bool), else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def read_metrics(path: str) -> tuple[list[dict], list[str]]:
    """The rows of `path` (JSON objects with an integer step, in file order) and a note for each
    line skipped: a torn last line or a damaged one."""
    with open(path, errors="replace") as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    rows, notes = [], []
    for n, line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        step = row.get("step") if isinstance(row, dict) else None
        if isinstance(step, int) and not isinstance(step, bool):
            rows.append(row)
        elif n == lines[-1][0]:
            notes.append(f"{METRICS} line {n}: skipped a torn last line (being written, or the run "
                         f"stopped mid-append): `{_clip(line)}`")
        else:
            notes.append(f"{METRICS} line {n}: skipped, not a metrics row: `{_clip(line)}`")
    return rows, notes


def stage_dirs(run_dir: str) -> list[tuple[str, str, int | None]]:
    """[(stage name, directory, steps)] of a recipe run directory (`RUN_DIR/recipe.json`, written
    by the recipe runner, `train.recipe`), in order; [] for a plain run directory."""
    path = os.path.join(run_dir, RECIPE)
    if not os.path.isfile(path):
        return []
    try:
        with open(path) as f:
            entries = json.load(f)["stages"]
        return [(e["name"], os.path.join(run_dir, e["dir"]), e.get("max_steps")) for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: cannot read the recipe state ({e})") from None


def read_run_metrics(run_dir: str) -> tuple[list[dict], list[str]]:
    """The rows of a run directory; for a recipe run directory every stage's rows in stage order,
    their steps counted on from the previous stages' (`stage_step`: the step within the stage)
    and `stage` set. The token counts already continue across stages."""
    stages = stage_dirs(run_dir)
    if not stages:
        return read_metrics(os.path.join(run_dir, METRICS))
    rows, notes, offset = [], [], 0
    for name, folder, steps in stages:
        path = os.path.join(folder, METRICS)
        if not os.path.isfile(path):
            continue  # a stage not started yet
        own, own_notes = read_metrics(path)
        notes += [f"stage {name}: {n}" for n in own_notes]
        for r in own:
            r["stage_step"], r["step"] = r["step"], r["step"] + offset
            r.setdefault("stage", name)
        rows += own
        offset += steps if isinstance(steps, int) else (own[-1]["stage_step"] if own else 0)
    return rows, notes


def run_folders(run_dir: str) -> list[tuple[str, str]]:
    """[(label prefix, directory)] holding a run's analyses and evaluations: the run directory,
    and a recipe's stage directories."""
    return [("", run_dir)] + [(f"{name} ", folder) for name, folder, _ in stage_dirs(run_dir)]


def _clip(line: str, width: int = 40) -> str:
    line = line.strip()
    return line if len(line) <= width else line[:width] + "..."


def series(rows: list[dict], key: str, x: str = "step") -> tuple[list, list]:
    """(x, key) of the rows where both are finite numbers."""
    pairs = [(number(r.get(x)), number(r.get(key))) for r in rows]
    pairs = [p for p in pairs if None not in p]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def stages(rows: list[dict]) -> list[dict]:
    """{stage, first, last, start_step, start_tokens} of each recipe stage (rows with a `stage`
    field; a row without one continues the stage before it): its first and last rows' steps, and
    the step and tokens where it began, those of the row before its first (0 for a run's start)."""
    out, current, before = [], object(), {"step": 0, "tokens": 0}
    for r in rows:
        if "stage" in r and r["stage"] != current:
            current = r["stage"]
            out.append({"stage": current, "first": r["step"], "start_step": before["step"],
                        "start_tokens": number(before.get("tokens"))})
        if out:
            out[-1]["last"] = r["step"]
        before = r
    return out


def _mean_last(rows: list[dict], key: str, last: int) -> tuple[float, int] | None:
    """The mean of `key` over the last `last` rows that have it, and how many there were."""
    values = series(rows, key)[1][-last:]
    return (sum(values) / len(values), len(values)) if values else None


def _extreme(rows: list[dict], key: str, pick) -> tuple[int, float] | None:
    """(step, value) of the row `pick` (min or max) chooses by `key`, the first such row."""
    steps, values = series(rows, key)
    if not values:
        return None
    i = values.index(pick(values))
    return int(steps[i]), values[i]


def _final(rows: list[dict], key: str) -> tuple[int, float] | None:
    steps, values = series(rows, key)
    return (int(steps[-1]), values[-1]) if values else None


def summarize(rows: list[dict], last: int = 10) -> dict:
    """The summary's numbers, each None when no row has its field; (step, value) pairs for the
    final, best and worst values, (mean, rows) for means over the last `last` rows that have
    the field (one row per log interval)."""
    skipped = series(rows, "skipped_steps")[1]
    return {"rows": len(rows), "steps": rows[-1]["step"], "tokens": _final(rows, "tokens"),
            "final_loss": _final(rows, "loss"), "best_loss": _extreme(rows, "loss", min),
            "final_val_loss": _final(rows, "val_loss"), "best_val_loss": _extreme(rows, "val_loss", min),
            "tokens_per_s": _mean_last(rows, "tokens_per_s", last), "mfu": _mean_last(rows, "mfu", last),
            "tflops_per_gpu": _mean_last(rows, "tflops_per_gpu", last),
            "skipped_steps": int(skipped[-1]) if skipped else None,
            "expert_load_max": _extreme(rows, "expert_load_max", max),
            "balance_loss": _mean_last(rows, "balance_loss", last),
            "firing_rate": next(((r["step"], r["firing_rate"]) for r in reversed(rows)
                                 if isinstance(r.get("firing_rate"), dict) and r["firing_rate"]), None),
            "peak_mem_gib": _extreme(rows, "peak_mem_gib", max), "stages": stages(rows)}


def skipped_rows(rows: list[dict]) -> list[tuple[int, int]]:
    """(step, n) of each row whose window skipped n > 0 steps (`skipped_steps` counts the run's)."""
    out, before = [], 0
    for step, total in zip(*series(rows, "skipped_steps")):
        if total > before:
            out.append((int(step), int(total - before)))
        before = total
    return out


def expert_load(rows: list[dict], notes: list[str]) -> tuple[list[int], np.ndarray] | None:
    """The steps and float [rows, L, E] loads of the rows whose `expert_load` has the shape of the
    last such row's (a run changes it only if restarted with another model; the others are
    left out with a note); None without."""
    loads = []
    for r in rows:
        try:
            a = np.asarray(r["expert_load"], dtype=float)
        except (KeyError, TypeError, ValueError):
            continue
        if a.ndim == 2 and a.size and np.isfinite(a).all():
            loads.append((r["step"], a))
    if not loads:
        return None
    shape = loads[-1][1].shape
    other = [s for s, a in loads if a.shape != shape]
    if other:
        notes.append(f"`expert_load`: left out {len(other)} row(s) not of the last rows' "
                     f"{shape[0]} layers x {shape[1]} experts (steps {other[0]}..{other[-1]})")
    loads = [(s, a) for s, a in loads if a.shape == shape]
    return [s for s, _ in loads], np.stack([a for _, a in loads])


def training_firing(rows: list[dict]) -> dict | None:
    """{target: (steps, firing rates)} of the rows' training `firing_rate` ({target: share of
    spike counts != 0}); None when no row has one (a run without model.spike.enabled)."""
    out = {}
    for r in rows:
        rates = r.get("firing_rate")
        step = number(r.get("step"))
        if not isinstance(rates, dict) or step is None:
            continue
        for target, rate in rates.items():
            if number(rate) is not None:
                steps, values = out.setdefault(str(target), ([], []))
                steps.append(step)
                values.append(float(rate))
    return out or None


def moe_layers(config: dict, count: int) -> list[int]:
    """The indices of the MoE layers of `config` (config.yaml), or 0..count-1 when it does not
    say or disagrees with the rows' `count` layers."""
    model = config.get("model") or {}
    try:
        ffns = LayerPlan(**model["layer_plan"]).resolve(int(model["num_layers"]))[1]
    except (KeyError, TypeError, ValueError):
        return list(range(count))
    layers = [i for i, f in enumerate(ffns) if f == "moe"]
    return layers if len(layers) == count else list(range(count))


def _read_json(path: str, notes: list[str], run_dir: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        notes.append(f"{os.path.relpath(path, run_dir)}: skipped, unreadable ({e})")
        return None


def _firing_rate(layer: dict, coding: str) -> float:
    rate = number(((layer.get("codings") or {}).get(coding) or {}).get("firing_rate"))
    return np.nan if rate is None else rate  # null in the report: nothing to count


def firing_reports(run_dir: str, notes: list[str]) -> list:
    """[(label, layers, {coding: firing rate by layer})] of the run's firing analyses, by step."""
    out = []
    for prefix, path in [(p, f) for p, folder in run_folders(run_dir)
                         for f in sorted(glob.glob(os.path.join(folder, "analysis", "*", "spikes", "report.json")))]:
        report = _read_json(path, notes, run_dir)
        layers = report.get("layers") if isinstance(report, dict) else None
        if not (isinstance(layers, list) and layers and all(isinstance(e, dict) for e in layers)):
            notes.append(f"{os.path.relpath(path, run_dir)}: no per-layer firing rates, skipped")
            continue
        label = os.path.basename(os.path.dirname(os.path.dirname(path)))
        label = prefix + (f"step {int(label[5:])}" if label.startswith("step_") and label[5:].isdigit() else label)
        rates = {c: [_firing_rate(e, c) for e in layers] for c in layers[0].get("codings", {})}
        out.append((label, [e.get("layer") for e in layers], rates))
    return out


def position_losses(run_dir: str, notes: list[str]) -> list:
    """[(file name, {bucket: loss})] of the evaluations `eval/*.json` with `loss_by_position`."""
    out = []
    for prefix, path in [(p, f) for p, folder in run_folders(run_dir)
                         for f in sorted(glob.glob(os.path.join(folder, "eval", "*.json")))]:
        data = _read_json(path, notes, run_dir)
        if data is None:
            continue
        losses = data.get("loss_by_position") if isinstance(data, dict) else None
        losses = {str(b): number(v) for b, v in losses.items()} if isinstance(losses, dict) else {}
        losses = {b: v for b, v in losses.items() if v is not None}
        if losses:
            out.append((prefix + os.path.splitext(os.path.basename(path))[0], losses))
        else:
            notes.append(f"{os.path.relpath(path, run_dir)}: no `loss_by_position` losses, skipped")
    return out


def read_config(run_dir: str, notes: list[str]) -> dict:
    """The run's resolved config.yaml as a dict ({} with a note when missing or unreadable)."""
    started = [folder for _, folder, _ in stage_dirs(run_dir) if os.path.isfile(os.path.join(folder, "config.yaml"))]
    path = os.path.join(started[-1] if started else run_dir, "config.yaml")  # a recipe: its latest stage's
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        notes.append(f"config.yaml: missing or unreadable, the model is not named ({type(e).__name__})")
        return {}
    return config if isinstance(config, dict) else {}


def draw(run_dir: str, rows: list[dict], config: dict, out: str, notes: list[str]) -> tuple[dict, dict]:
    """Draws every figure the run has data for into `out`; returns ({figure: what it drew},
    {figure: why it is not drawn}), and removes a figure file of an earlier report that is not
    drawn now."""
    path = {name: os.path.join(out, file) for name, file in FIGURES.items()}
    starts = stages(rows)
    by_step = [(s["start_step"], s["stage"]) for s in starts]
    by_tokens = [(s["start_tokens"], s["stage"]) for s in starts if s["start_tokens"] is not None]
    drawn, missing = {}, {}

    loss = series(rows, "loss", "tokens")
    val = series(rows, "val_loss", "tokens")
    if loss[0]:
        if not val[0]:
            notes.append("no row has a `val_loss`: the loss figure shows the training loss only")
        drawn["loss"] = figs.plot_loss(path["loss"], loss, val if val[0] else None, by_tokens)
    else:
        missing["loss"] = "no row has a finite `loss` and `tokens`"
    lr = series(rows, "lr")
    if lr[0]:
        drawn["lr"] = figs.plot_lr(path["lr"], lr, by_step)
    else:
        missing["lr"] = "no row has an `lr`"
    tps = series(rows, "tokens_per_s")
    efficiency = next(((k, *s) for k in ("mfu", "tflops_per_gpu") if (s := series(rows, k))[0]), None)
    if tps[0]:
        drawn["throughput"] = figs.plot_throughput(path["throughput"], tps, efficiency, by_step)
    else:
        missing["throughput"] = "no row has a `tokens_per_s`"
    norm = series(rows, "grad_norm")
    if norm[0]:
        drawn["grad_norm"] = figs.plot_grad_norm(path["grad_norm"], norm, skipped_rows(rows), by_step)
    else:
        missing["grad_norm"] = "no row has a finite `grad_norm`"
    load = expert_load(rows, notes)
    if load:
        steps, shares = load
        balance = series(rows, "balance_loss")
        drawn["expert_load"] = figs.plot_expert_load(path["expert_load"], steps, shares,
                                                     moe_layers(config, shares.shape[1]), by_step,
                                                     balance if balance[0] else None)
    else:
        missing["expert_load"] = "no row has an `expert_load` (a model without MoE layers)"
    firing = firing_reports(run_dir, notes)
    training = training_firing(rows)
    if firing or training:
        drawn["firing"] = figs.plot_firing(path["firing"], firing, training, by_step)
    else:
        missing["firing"] = ("no firing analysis in analysis/*/spikes/report.json "
                             "(`python launch/spikes.py RUN_DIR` writes one) and no row has a "
                             "`firing_rate` (training with model.spike.enabled logs it)")
    positions = position_losses(run_dir, notes)
    if positions:
        drawn["loss_by_position"] = figs.plot_loss_by_position(path["loss_by_position"], positions)
    else:
        missing["loss_by_position"] = "no evaluation eval/*.json with a `loss_by_position`"
    for name in missing:
        if os.path.exists(path[name]):
            os.remove(path[name])
    return drawn, missing


def _count(value) -> str:
    return "not logged" if value is None else f"{value:,.0f}"


def _at(pair, fmt: str) -> str:
    return "not logged" if pair is None else f"{pair[1]:{fmt}} (step {pair[0]})"


def _rates(pair) -> str:
    if pair is None:
        return "not logged"
    return ", ".join(f"{t} {r:.3f}" for t, r in pair[1].items() if number(r) is not None) + f" (step {pair[0]})"


def _mean(pair, fmt: str) -> str:
    return "not logged" if pair is None else f"{pair[0]:{fmt}} (mean of the last {pair[1]} rows)"


def markdown(run_dir: str, config: dict, summary: dict, drawn: dict, missing: dict,
             notes: list[str]) -> str:
    """report.md: the summary table, the stages, the figures, what is not drawn and why."""
    s, model = summary, (config.get("model") or {}).get("name", "unknown")
    lines = [f"# Run report: {os.path.basename(os.path.abspath(run_dir))}", "",
             f"Model `{model}`; `{os.path.abspath(run_dir)}`, {s['rows']} rows of {METRICS}.", "",
             "| quantity | value |", "| --- | --- |",
             f"| steps | {s['steps']} |", f"| tokens | {_count(s['tokens'] and s['tokens'][1])} |",
             f"| final loss | {_at(s['final_loss'], '.4f')} |",
             f"| best loss | {_at(s['best_loss'], '.4f')} |",
             f"| final validation loss | {_at(s['final_val_loss'], '.4f')} |",
             f"| best validation loss | {_at(s['best_val_loss'], '.4f')} |",
             f"| tokens/s | {_mean(s['tokens_per_s'], ',.1f')} |",
             f"| MFU | {_mean(s['mfu'], '.2%')} |",
             f"| model TFLOP/s per GPU | {_mean(s['tflops_per_gpu'], '.4g')} |",
             f"| skipped steps | {_count(s['skipped_steps'])} |",
             "| max expert-load imbalance (busiest expert / mean) | "
             f"{_at(s['expert_load_max'], '.4f')} |",
             f"| balance loss | {_mean(s['balance_loss'], '.4g')} |",
             f"| firing rate in training (share of spike counts != 0) | {_rates(s['firing_rate'])} |",
             f"| peak memory (GiB) | {_at(s['peak_mem_gib'], '.2f')} |", ""]
    if s["stages"]:
        lines += ["## Stages", "", "| stage | steps | tokens at its start |", "| --- | --- | --- |"]
        lines += [f"| {st['stage']} | {st['first']}-{st['last']} | {_count(st['start_tokens'])} |"
                  for st in s["stages"]]
        lines.append("")
    lines += ["## Figures", ""]
    shown = [f"![{TITLES[name]}]({FIGURES[name]})\n" for name in FIGURES if name in drawn]
    lines += shown or ["None.\n"]
    if missing or notes:
        lines += ["## Not drawn, and notes", ""]
        lines += [f"- {TITLES[name]} ({FIGURES[name]}): {why}" for name, why in missing.items()]
        lines += [f"- {note}" for note in notes]
        lines.append("")
    return "\n".join(lines)


def write_report(run_dir: str, out: str | None = None, last: int = 10) -> dict:
    """Writes report.md and the figures of `run_dir` into `out` (None: RUN_DIR/report); means
    are over the last `last` rows. Returns {"out", "report", "figures" {name: what it drew},
    "missing" {name: why}, "summary", "notes"}. A missing run directory or metrics.jsonl is a
    FileNotFoundError, a metrics.jsonl without rows a ValueError, each naming the path."""
    if last < 1:
        raise ValueError(f"--last must be >= 1, got {last}")
    metrics = os.path.join(run_dir, METRICS)
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    recipe = bool(stage_dirs(run_dir))
    if not recipe and not os.path.isfile(metrics):
        raise FileNotFoundError(f"{metrics}: not found; RUN_DIR must be a training run directory "
                                f"(train.run_dir), which holds {METRICS} once the first step is logged")
    rows, notes = read_run_metrics(run_dir)
    metrics = os.path.join(run_dir, STAGES, "*", METRICS) if recipe else metrics
    if not rows:
        raise ValueError(f"{metrics} holds no metrics rows yet (the first is written after step 1)")
    config = read_config(run_dir, notes)
    out = os.path.abspath(out or os.path.join(run_dir, "report"))
    os.makedirs(out, exist_ok=True)
    drawn, missing = draw(run_dir, rows, config, out, notes)
    summary = summarize(rows, last)
    report = os.path.join(out, REPORT)
    tmp = f"{report}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(markdown(run_dir, config, summary, drawn, missing, notes))
    os.replace(tmp, report)
    return {"out": out, "report": report, "figures": drawn, "missing": missing,
            "summary": summary, "notes": notes}
