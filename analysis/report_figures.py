"""Figures of a run report (`analysis.report`): PNG files drawn with matplotlib's Agg canvas in
the style of the firing figures (`analysis.spike_figures`), sized for a paper column pair.

Every function takes plain sequences (the report extracts them from the run's files), writes one
PNG atomically (a temporary name renamed at the end, so a reader never sees half a file) and
returns what it drew, so tests can check the picture's content. `stages` is a list of
(x, name): where each recipe stage starts on the figure's x axis (the previous stage's last
row); every start after the first draws a boundary line, and each stage is named at its start.
"""
from __future__ import annotations

import os

import matplotlib
import numpy as np
from matplotlib.ticker import EngFormatter, MaxNLocator, PercentFormatter

# the shared canvas and style; both move with the firing figures into analysis/ later
from analysis.spike_figures import CODING_LABEL, STYLE, _figure

TOKENS = EngFormatter(sep="")  # 1.5M, 150G: tokens read at a glance
SKIP = "#d62728"


def _save(fig, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


def _stage_lines(ax, stages) -> list:
    """Draws the boundaries of `stages` on `ax`, each stage named at its start (the first at the
    left edge); returns the x of each boundary line."""
    for i, (x, name) in enumerate(stages):
        if i:
            ax.axvline(x, color="0.4", lw=0.9, ls="--")
        ax.annotate(str(name), (x if i else 0, 1),
                    xycoords=("data" if i else "axes fraction", "axes fraction"), xytext=(3, -3),
                    textcoords="offset points", va="top", fontsize=8, color="0.3")
    return [x for x, _ in stages[1:]]


def _time_axes(fig, rows: int = 1, height_ratios=None):
    """`rows` panels over one shared x axis (steps or tokens: whole numbers)."""
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False, height_ratios=height_ratios)[:, 0]
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    return axes


def plot_loss(path: str, loss, val=None, stages=()) -> dict:
    """loss, val: (tokens, loss) sequences; val None when the run has no validation loss."""
    with matplotlib.rc_context(STYLE):
        fig = _figure(7, 4)
        (ax,) = _time_axes(fig)
        ax.plot(*loss, color="tab:blue", lw=1.2, label="training loss (mean since the last row)")
        if val is not None:
            ax.plot(*val, color="tab:orange", marker="o", ms=3.5, lw=1.2, label="validation loss")
        boundaries = _stage_lines(ax, list(stages))
        ax.xaxis.set_major_formatter(TOKENS)
        ax.set_xlabel("tokens")
        ax.set_ylabel("loss (nats / token)")
        ax.set_title("Loss against training tokens")
        ax.legend(frameon=False)
        _save(fig, path)
    return {"loss": loss, "val_loss": val, "boundaries": boundaries}


def plot_lr(path: str, lr, stages=()) -> dict:
    """lr: (step, learning rate) sequences."""
    with matplotlib.rc_context(STYLE):
        fig = _figure(7, 3.2)
        (ax,) = _time_axes(fig)
        ax.plot(*lr, color="tab:green", lw=1.2)
        boundaries = _stage_lines(ax, list(stages))
        ax.set_xlabel("step")
        ax.set_ylabel("learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.set_title("Learning-rate schedule")
        _save(fig, path)
    return {"lr": lr, "boundaries": boundaries}


def plot_throughput(path: str, tokens_per_s, efficiency=None, stages=()) -> dict:
    """tokens_per_s: (step, tokens/s); efficiency: ("mfu" | "tflops_per_gpu", steps, values) for a
    second panel (MFU as a percentage of the device peak), None for none."""
    with matplotlib.rc_context(STYLE):
        fig = _figure(7, 5 if efficiency else 3.2)
        axes = _time_axes(fig, 2 if efficiency else 1)
        axes[0].plot(*tokens_per_s, color="tab:purple", lw=1.2)
        axes[0].yaxis.set_major_formatter(TOKENS)
        axes[0].set_ylabel("tokens / s (all ranks)")
        if efficiency:
            key, steps, values = efficiency
            axes[1].plot(steps, values, color="tab:brown", lw=1.2)
            if key == "mfu":
                axes[1].yaxis.set_major_formatter(PercentFormatter(1.0))
            axes[1].set_ylabel("MFU (of bf16 peak)" if key == "mfu" else "model TFLOP/s per GPU")
        boundaries = [_stage_lines(ax, list(stages)) for ax in axes][0]
        axes[-1].set_xlabel("step")
        title = "Throughput"
        if efficiency:
            title += " and MFU" if efficiency[0] == "mfu" else " and model FLOP/s"
        axes[0].set_title(title)
        _save(fig, path)
    return {"tokens_per_s": tokens_per_s, "efficiency": efficiency, "boundaries": boundaries}


def plot_grad_norm(path: str, grad_norm, skipped=(), stages=()) -> dict:
    """grad_norm: (step, norm before clipping); skipped: (step, n) for each row whose window
    skipped n steps (a NaN/Inf loss or gradient), drawn as red lines."""
    with matplotlib.rc_context(STYLE):
        fig = _figure(7, 3.6)
        (ax,) = _time_axes(fig)
        ax.plot(*grad_norm, color="tab:blue", lw=1.0, label="gradient norm")
        if min(grad_norm[1]) > 0:
            ax.set_yscale("log")
        for i, (step, _) in enumerate(skipped):
            ax.axvline(step, color=SKIP, lw=1.0, alpha=0.7,
                       label=f"skipped steps ({sum(n for _, n in skipped)} in all)" if not i else None)
        boundaries = _stage_lines(ax, list(stages))
        ax.set_xlabel("step")
        ax.set_ylabel("gradient norm (before clipping)")
        ax.set_title("Gradient norm and skipped steps")
        ax.legend(frameon=False)
        _save(fig, path)
    return {"grad_norm": grad_norm, "skipped": list(skipped), "boundaries": boundaries}


def plot_expert_load(path: str, steps, load: np.ndarray, layers, stages=(), balance=None) -> dict:
    """load float [rows, L, E]: each MoE layer's share of routed tokens per expert in each row's
    window; layers: the L layers' indices; balance: (step, balance loss) or None. Top: the
    busiest expert over the mean share, the worst layer, and the balance loss (right axis);
    below: a heatmap of (layer, expert) against step, coloured by load over the balanced load 1 / E."""
    rows, n_layers, n_experts = load.shape
    relative = load * n_experts
    image = relative.reshape(rows, n_layers * n_experts).T  # [L * E, rows], layer-major
    edges = np.asarray(steps, dtype=float)
    # cells span half-way to the neighbouring rows (log points need not be evenly spaced)
    mid = (edges[1:] + edges[:-1]) / 2 if rows > 1 else np.array([])
    x = np.concatenate([[edges[0] - (mid[0] - edges[0] if rows > 1 else 0.5)], mid,
                        [edges[-1] + (edges[-1] - mid[-1] if rows > 1 else 0.5)]])
    worst = relative.max(axis=2).max(axis=1)
    with matplotlib.rc_context(STYLE):
        fig = _figure(7, float(np.clip(2.5 + 0.12 * n_layers * n_experts, 4, 10)))
        top, ax = _time_axes(fig, 2, height_ratios=[1, 3])
        top.plot(steps, worst, color="tab:red", lw=1.2)
        top.axhline(1, color="0.5", lw=0.8, ls=":")
        top.set_ylabel("max / mean")
        if balance is not None:
            right = top.twinx()
            right.plot(*balance, color="tab:blue", lw=1.0, ls="--", label="balance loss")
            right.set_ylabel("balance loss", color="tab:blue")
            right.tick_params(axis="y", colors="tab:blue")
        mesh = ax.pcolormesh(x, np.arange(n_layers * n_experts + 1) - 0.5, image, cmap="magma",
                             vmin=0, vmax=max(float(image.max()), 1.0), shading="flat")
        ax.grid(False)
        for i in range(1, n_layers):
            ax.axhline(i * n_experts - 0.5, color="white", lw=1.2)
        ax.set_yticks([i * n_experts + (n_experts - 1) / 2 for i in range(n_layers)],
                      [f"layer {layer}" for layer in layers])
        ax.set_ylim(n_layers * n_experts - 0.5, -0.5)
        ax.set_ylabel(f"{n_experts} experts per layer")
        ax.set_xlabel("step")
        fig.colorbar(mesh, ax=ax, label="load / balanced load")
        boundaries = [_stage_lines(a, list(stages)) for a in (top, ax)][0]
        top.set_title("Expert load per MoE layer")
        _save(fig, path)
    return {"steps": list(steps), "layers": list(layers), "image": image, "worst": worst,
            "balance_loss": balance, "boundaries": boundaries}


def plot_firing(path: str, reports, training=None, stages=()) -> dict:
    """reports: [(label, layers, {coding: firing rates by layer})], one per firing analysis (in
    training order); one panel per coding, one line per analysis. training: {target: (steps,
    share of spike counts != 0)} from the metrics rows, a last panel against step (None: none)."""
    codings = list(dict.fromkeys(c for _, _, rates in reports for c in rates))
    panels = len(codings) + (training is not None)
    cols = min(panels, 2)
    with matplotlib.rc_context(STYLE):
        fig = _figure(4 * cols, 3.2 * -(-panels // cols))
        axes = fig.subplots(-(-panels // cols), cols, squeeze=False).ravel()
        colours = matplotlib.colormaps["viridis"](np.linspace(0.1, 0.9, len(reports)))
        for ax, coding in zip(axes, codings):
            for colour, (label, layers, rates) in zip(colours, reports):
                if coding in rates:
                    ax.plot(layers, rates[coding], marker="o", ms=3.5, color=colour, label=label)
            ax.set_title(CODING_LABEL.get(coding, coding))
            ax.set_xlabel("layer")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("firing rate (spikes / channel / step)")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        if training is not None:
            ax = axes[len(codings)]
            for target, (steps, rates) in training.items():
                ax.plot(steps, rates, lw=1.2, label=target)
            _stage_lines(ax, list(stages))
            ax.set_title("In training (metrics rows)" if codings else "")
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("share of spike counts != 0")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
            ax.legend(frameon=False)
        for ax in axes[panels:]:
            ax.set_visible(False)
        if codings:
            axes[0].legend(frameon=False)
        fig.suptitle("Firing rate by layer (launch/spikes.py analyses)" if not training else
                     "Firing rates" + (" (launch/spikes.py analyses and training)" if codings else " in training"))
        _save(fig, path)
    return {"codings": codings, "reports": list(reports), "training": training}


def plot_loss_by_position(path: str, evals) -> dict:
    """evals: [(label, {bucket: loss})], one per evaluation file; buckets in the order given."""
    buckets = list(dict.fromkeys(b for _, losses in evals for b in losses))
    with matplotlib.rc_context(STYLE):
        fig = _figure(7, 3.6)
        ax = fig.add_subplot()
        for label, losses in evals:
            xs = [i for i, b in enumerate(buckets) if b in losses]
            ax.plot(xs, [losses[buckets[i]] for i in xs], marker="o", ms=4, lw=1.2, label=label)
        ax.set_xticks(range(len(buckets)), buckets, rotation=30 if len(buckets) > 6 else 0)
        ax.set_xlabel("token position")
        ax.set_ylabel("held-out loss (nats / token)")
        ax.set_title("Loss by position in the context")
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
        _save(fig, path)
    return {"buckets": buckets, "evals": list(evals)}
