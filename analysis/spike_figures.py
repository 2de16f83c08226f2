"""Figures of a firing report (`analysis.spike_report`): PNG files drawn with matplotlib's Agg
canvas (no pyplot, no display, no global backend switch).

- `raster_<coding>.png`: spike trains of a window of tokens x neurons of one capture, each
  token's counts expanded over a common T steps per coding, tokens side by side in time.
- `count_histogram.png`: the distribution of spike counts over all captures, log scale.
- `layers.png`: sparsity over the report's window and firing rate per layer, by coding.

Every plotting function returns the arrays it drew, so tests can check the picture's content.
"""
from __future__ import annotations

import os

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from model.spike_coding import CODINGS, encode, steps_needed

DPI = 150
STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
         "xtick.labelsize": 9, "ytick.labelsize": 9}
NEG, POS = "#2166ac", "#b2182b"  # -1 / +1 spikes (colour-blind safe blue / red)
RASTER_CMAP = ListedColormap([NEG, "white", POS])
RASTER_NORM = BoundaryNorm([-1.5, -0.5, 0.5, 1.5], 3)
CODING_LABEL = {"binary": "binary (2 populations)", "ternary": "ternary", "bitwise": "bitwise",
                "twos_complement": "two's complement"}


def _figure(width: float, height: float):
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def raster_image(counts: torch.Tensor, coding: str) -> dict:
    """counts int [tokens, N] -> {"coding", "steps": T, "populations", "image": int8 [rows,
    tokens * T]}: column j * T + t is step t of token j. T is the steps the window needs (at
    least 1). Binary has 2N rows: the positive population max(s, 0) on top, the negative one
    max(-s, 0) below, its spikes stored as -1 so they draw in the negative colour."""
    counts = counts.to(torch.int64)
    if coding == "binary":
        pos, neg = counts.clamp(min=0), (-counts).clamp(min=0)
        T = max(steps_needed(pos, coding), steps_needed(neg, coding), 1)
        train = torch.cat([encode(pos, coding, T), -encode(neg, coding, T)], dim=-1)
    else:
        T = max(steps_needed(counts, coding), 1)
        train = encode(counts, coding, T)
    image = train.permute(2, 1, 0).reshape(train.shape[2], -1)  # [T, tok, rows] -> [rows, tok*T]
    return {"coding": coding, "steps": T, "populations": 2 if coding == "binary" else 1,
            "image": image}


def plot_raster(path: str, counts: torch.Tensor, coding: str, *, capture: str, k: float,
                first_row: int = 0) -> dict:
    """Draws `raster_image(counts, coding)` to `path`; returns it."""
    data = raster_image(counts, coding)
    image, T = data["image"], data["steps"]
    tokens, n = counts.shape
    width = float(np.clip(2.5 + tokens * T * 0.08, 7, 16))
    height = float(np.clip(1.8 + image.shape[0] * 0.045, 4, 11))
    with matplotlib.rc_context(STYLE):
        fig = _figure(width, height)
        ax = fig.add_subplot()
        ax.imshow(image.numpy(), cmap=RASTER_CMAP, norm=RASTER_NORM, aspect="auto",
                  interpolation="nearest")
        for j in range(1, tokens):
            ax.axvline(j * T - 0.5, color="0.35", lw=0.8)
        ax.set_xticks([j * T + (T - 1) / 2 for j in range(tokens)],
                      [str(first_row + j) for j in range(tokens)])
        order = ", LSB first" if coding in ("bitwise", "twos_complement") else ""
        ax.set_xlabel(f"time: token (row {first_row}..{first_row + tokens - 1}) x {T} step"
                      f"{'s' if T > 1 else ''} each{order}")
        if coding == "binary":
            ax.axhline(n - 0.5, color="0.2", lw=1.0, ls="--")
            ax.set_yticks([(n - 1) / 2, n + (n - 1) / 2], ["+ population\nneurons 0..%d" % (n - 1),
                                                         "- population\nneurons 0..%d" % (n - 1)])
            handles = [Patch(color=POS, label="spike, + population (s > 0)"),
                       Patch(color=NEG, label="spike, - population (s < 0)")]
        elif coding == "twos_complement":
            ax.set_ylabel("neuron (input feature)")
            handles = [Patch(color=POS, label=f"spike (bit 1; the last\nstep weighs $-2^{{{T - 1}}}$)")]
        else:
            ax.set_ylabel("neuron (input feature)")
            handles = [Patch(color=POS, label="+1 spike"), Patch(color=NEG, label="-1 spike")]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
        ax.set_title(f"{CODING_LABEL[coding]} spike trains, {capture} input (k = {k:g}, "
                     f"T = {T})")
        fig.savefig(path)
    return data


def plot_count_histogram(path: str, histogram: dict, le7: float, *, k: float) -> dict:
    """Bars of `histogram` ({"values", "counts", "underflow", "overflow"}), log y, with the
    |s| <= 7 band marked; returns {"values", "counts"} as drawn (outside bins at lo-2, hi+2)."""
    values, counts = list(histogram["values"]), list(histogram["counts"])
    lo, hi = values[0], values[-1]
    x = [lo - 2] + values + [hi + 2]
    y = [histogram["underflow"]] + counts + [histogram["overflow"]]
    with matplotlib.rc_context(STYLE):
        fig = _figure(8, 4.5)
        ax = fig.add_subplot()
        ax.axvspan(-7.5, 7.5, color="tab:green", alpha=0.12, lw=0,
                   label=f"|s| <= 7: {le7:.1%} of entries")
        ax.bar(values, counts, width=0.85, color="0.3", label="entries per count")
        ax.bar([x[0], x[-1]], [y[0], y[-1]], width=1.6, color="white", edgecolor="0.3",
               hatch="///", label=f"outside {lo}..{hi}")
        ax.set_yscale("log")
        inner = [t for t in range(lo + 1, hi) if t % 8 == 0]  # the edges are the outside bars'
        ax.set_xticks([lo - 2] + inner + [hi + 2], [f"<{lo}"] + [str(t) for t in inner] + [f">{hi}"])
        ax.set_xlabel("spike count s = round(x / V_th)")
        ax.set_ylabel("entries (token x feature), log scale")
        ax.set_title(f"Spike counts entering the spiked projections (k = {k:g})")
        ax.legend(loc="upper right", frameon=False)
        fig.savefig(path)
    return {"values": x, "counts": y}


def plot_layers(path: str, layers: list, *, window: int, k: float) -> dict:
    """Per-layer sparsity (over `window` steps) and firing rate for every coding; returns
    {"layer": [...], "sparsity": {coding: [...]}, "firing_rate": {coding: [...]}}."""
    idx = [e["layer"] for e in layers]
    series = {m: {c: [e["codings"][c][m] for e in layers] for c in CODINGS}
              for m in ("sparsity", "firing_rate")}
    with matplotlib.rc_context(STYLE):
        fig = _figure(10, 4)
        for ax, (metric, label) in zip(fig.subplots(1, 2), (
                ("sparsity", f"sparsity over a {window}-step window"),
                ("firing_rate", "firing rate (spikes / channel / step)"))):
            for c, marker in zip(CODINGS, "osD^"):
                ax.plot(idx, series[metric][c], marker=marker, label=CODING_LABEL[c])
            ax.set_xlabel("layer")
            ax.set_ylabel(label)
            ax.set_xticks(idx)
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
        ax.legend(frameon=False)
        fig.suptitle(f"Firing by layer, all spiked inputs pooled (k = {k:g})")
        fig.savefig(path)
    return {"layer": idx, **series}


def write_figures(out_dir: str, report: dict, raster: dict) -> dict:
    """All figures of `report` into `out_dir`; raster: {"capture", "counts" int [tokens, N],
    "rows" [start, stop]}. Returns {file name: what it drew}."""
    drawn = {}
    for c in CODINGS:
        name = f"raster_{c}.png"
        drawn[name] = plot_raster(os.path.join(out_dir, name), raster["counts"], c,
                                  capture=raster["capture"], k=report["k"],
                                  first_row=raster["rows"][0])
    drawn["count_histogram.png"] = plot_count_histogram(
        os.path.join(out_dir, "count_histogram.png"), report["histogram"],
        report["overall"]["le7"], k=report["k"])
    if report["layers"]:
        drawn["layers.png"] = plot_layers(os.path.join(out_dir, "layers.png"), report["layers"],
                                          window=report["window"], k=report["k"])
    return drawn
