"""Firing analysis of a trained model: the spike counts entering every spiked projection.

    report, raster = analyze(checkpoint, samples=8)
    save_report(out_dir, report, raster)      # report.json + PNG figures (analysis.spike_figures)

1. Load the model in full precision (`analysis.evaluate`), draw the sample text, measure the loss.
2. Attach spiking at k (`model.spiking.attach_spiking`, as training does) and, ahead of each
   spiking hook, a capture hook (`SpikeCapture`) that recomputes the integer counts of the same
   input with the same op; measure the loss again, which runs the capture. Projections fed the
   very same tensor (q/k/v, gate/up, ...) share one capture, named after the first of them.
3. From each capture's value histogram, statistics for every spike coding
   (`model.spike_coding.spike_stats_from_histogram`), per capture, per layer and pooled.

Captures accumulate on the model's device: a value histogram over -R..R with R = ceil(k * D)
(|s| = |x| / V_th <= sum|x| / V_th = k * D, as V_th >= mean|x| / k unless the v_max clamp
applies, i.e. never in practice), per-feature firing counts, and the raster window; nothing
syncs with the host until the end. Per-feature counts of the routed experts' hidden input are
pooled over the experts (a feature is dead only if it is silent in every expert), since the
grouped-GEMM backend may hand `hidden_fn` all experts' rows at once.

report.json: checkpoint, model, k, targets, window, samples, seq_len, tokens, device, data,
loss {float, spiking, delta}; "overall" (all text captures pooled), "layers" [{layer, ...}] and
"captures" [{name, layer, target, shares, input ("activation" | "parameter"), rows, features,
...}] each with numel, le7 (share of |s| <= 7), silent_share, mean_abs, channels, dead_channels,
dead_fraction and "codings" {coding: spike_stats minus the histogram; binary on the two-population
split, numel 2N, "populations": 2}; "histogram" (pooled counts -32..32, underflow, overflow);
"raster" {capture, rows, neurons, steps per coding}; "figures"; "out". NaN is written as null.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import weakref
from collections import Counter

import torch
from torch import nn

from model.hf.checkpoint import atomic_output_dir
from model.moe import Experts
from model.quant import QuantExperts
from model.spike_coding import CODINGS, spike_stats_from_histogram
from model.spiking import attach_spiking, detach_spiking, projections, target_of
from ops.spike import spike_quantize
from .evaluate import data_config, evaluate_loss, load_model, sample_batches
from train.export import resolve_checkpoint

REPORT_FILE = "report.json"
HIST_RANGE = (-32, 32)
LOW_COUNT = 7  # the report's "|s| <= 7" share


def capture_names(model: nn.Module, targets) -> set[str]:
    """Every projection name a capture may be named after or share with (experts: the stacked
    `.gate_proj`, `.up_proj`, `.down_proj`)."""
    names = set()
    for name, module in projections(model, targets).items():
        if isinstance(module, (Experts, QuantExperts)):
            names.update(f"{name}.{p}" for p in ("gate_proj", "up_proj", "down_proj"))
        else:
            names.add(name)
    return names


@dataclasses.dataclass
class Capture:
    """Running totals of one distinct projection input x [..., D]: `hist` int64 [2R + 1] (value
    v at index v + R), `fired` int64 [D] (rows in which each feature's count is nonzero),
    `window` int32 [tokens, neurons] (the raster's counts: rows window_start.. of the first
    batch's input flattened to [rows, D])."""

    name: str
    target: str  # the model.spike.targets group
    members: list
    parameter: bool  # the input is a model parameter (hybrid sink tokens), not text activations
    radius: int
    hist: torch.Tensor
    fired: torch.Tensor
    rows: int = 0
    window: torch.Tensor | None = None
    window_start: int = 0


class SpikeCapture:
    """Context manager recording the spike counts of every spiked input of `model`.

    Attach spiking first (`attach_spiking(model, spike_cfg)`): the capture hooks are prepended,
    so they see each projection's input before its spiking hook, and the experts' `hidden_fn` is
    wrapped. The model computes exactly as without the capture. The raster window kept from
    the first batch: `tokens` rows from `raster_start` (moved back where the input has fewer
    rows), the first `neurons` features.
    """

    def __init__(self, model: nn.Module, spike_cfg, raster_start: int = 0, tokens: int = 8,
                 neurons: int = 64):
        self.model, self.k, self.targets = model, float(spike_cfg.k), list(spike_cfg.targets)
        self.raster_start, self.tokens, self.neurons = raster_start, tokens, neurons
        self.captures: dict[str, Capture] = {}
        self._params = {p.data_ptr() for p in model.parameters()}
        self._handles, self._hidden = [], {}
        self._seen: dict[int, tuple] = {}
        self._calls: Counter = Counter()
        self._batches = 0

    def __enter__(self):
        self._handles.append(self.model.register_forward_pre_hook(self._new_forward))
        for name, module in projections(self.model, self.targets).items():
            if isinstance(module, (Experts, QuantExperts)):
                hook = self._experts_hook(name)
                self._hidden[module] = module.hidden_fn
                module.hidden_fn = self._hidden_fn(f"{name}.down_proj", module.hidden_fn)
            else:
                hook = self._linear_hook(name)
            self._handles.append(module.register_forward_pre_hook(hook, prepend=True))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        for module, fn in self._hidden.items():
            module.hidden_fn = fn
        self._handles, self._hidden = [], {}

    def _new_forward(self, module, args):
        # Sharing is by tensor identity within one forward; names restart every forward so each
        # batch adds to the same captures.
        self._seen, self._calls = {}, Counter()
        self._batches += 1

    def _linear_hook(self, name):
        return lambda module, args: self.record(args[0], [name], target_of(name))

    def _experts_hook(self, name):
        # Every expert's gate and up projections read the routed rows x_perm [M, D].
        return lambda module, args: self.record(args[0], [f"{name}.gate_proj", f"{name}.up_proj"],
                                                "experts")

    def _hidden_fn(self, name, spike_fn):
        def hidden_fn(h):
            # Called once per expert segment: all segments add to one capture.
            self.record(h, [name], "experts", key=name)
            return spike_fn(h)
        return hidden_fn

    def record(self, x: torch.Tensor, members: list, target: str, key: str | None = None) -> None:
        """Adds the counts of x [..., D], read by the projections `members` (of spike target
        `target`), to the capture of this tensor: new unless an earlier projection of this forward
        read the very same tensor; `key` names it instead of the first member."""
        call = self._calls[members[0]]
        self._calls.update(members)
        seen = self._seen.get(id(x))
        if seen is not None and seen[0]() is x:  # a live weakref: not a recycled id
            cap = seen[1]
            cap.members += [m for m in members if m not in cap.members]
            return
        if key is None:  # a projection's later calls on other tensors (k_proj on sink tokens)
            key = members[0] if call == 0 else f"{members[0]}#{call}"
        cap = self.captures.get(key)
        if cap is None:
            d = x.shape[-1]
            radius = math.ceil(self.k * d)
            cap = self.captures[key] = Capture(
                key, target, list(members), x.data_ptr() in self._params, radius,
                torch.zeros(2 * radius + 1, dtype=torch.int64, device=x.device),
                torch.zeros(d, dtype=torch.int64, device=x.device))
        self._seen[id(x)] = (weakref.ref(x), cap)
        counts = spike_quantize(x.detach(), self.k, return_counts=True).counts.reshape(-1, x.shape[-1])
        r = cap.radius
        cap.hist += torch.bincount((counts.clamp(-r, r) + r).flatten(), minlength=2 * r + 1)
        cap.fired += (counts != 0).sum(0)
        if self._batches == 1 and cap.window is None and counts.shape[0]:
            cap.window_start = max(min(self.raster_start, counts.shape[0] - self.tokens), 0)
            cap.window = counts[cap.window_start:cap.window_start + self.tokens, :self.neurons].clone()
        cap.rows += counts.shape[0]


# --------------------------------------------------------------------------- statistics


def histogram_of(cap: Capture) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, freq), int64 [V] each, of the counts a capture saw (CPU)."""
    hist = cap.hist.cpu()
    present = torch.nonzero(hist).squeeze(1)
    return present - cap.radius, hist[present]


def two_populations(values: torch.Tensor, freq: torch.Tensor):
    """Binary coding's split of signed counts: each s becomes a positive-population count
    max(s, 0) and a negative-population count max(-s, 0), so 2N channels."""
    return torch.cat([values.clamp(min=0), (-values).clamp(min=0)]), torch.cat([freq, freq])


def firing_stats(values, freq, window: int, fired=None) -> dict:
    """Statistics of counts given as a histogram (values, freq [V]; repeats allowed) for every
    coding, plus coding-independent ones; with `fired` (int64 [channels], rows in which each
    feature fired) the dead channels too."""
    n = int(freq.sum())
    absv = values.abs()
    out = {"numel": n,
           "le7": _ratio(int(freq[absv <= LOW_COUNT].sum()), n),
           "silent_share": _ratio(int(freq[values == 0].sum()), n),
           "mean_abs": _ratio(int((absv * freq).sum()), n)}
    if fired is not None:
        dead = int((fired == 0).sum())
        out.update(channels=fired.numel(), dead_channels=dead,
                   dead_fraction=_ratio(dead, fired.numel()))
    codings = {}
    for c in CODINGS:
        # Binary cannot carry a sign: report it on the standard two-population split.
        pair = two_populations(values, freq) if c == "binary" else (values, freq)
        st = spike_stats_from_histogram(*pair, c, window)
        for key in ("coding", "window", "histogram"):
            st.pop(key)
        codings[c] = {**st, "populations": 2} if c == "binary" else st
    out["codings"] = codings
    return out


def _ratio(a: int, n: int) -> float:
    return a / n if n else float("nan")  # NaN becomes null in the JSON


def _pooled(caps: list[Capture], window: int) -> dict:
    hists = [histogram_of(c) for c in caps]
    fired = torch.cat([c.fired.cpu() for c in caps])
    return firing_stats(torch.cat([h[0] for h in hists]), torch.cat([h[1] for h in hists]),
                        window, fired)


def layer_of(name: str) -> int | None:
    m = re.match(r"layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _shares(cap: Capture) -> list[str]:
    """The other projections reading the capture's input, relative to the first one's parent."""
    parent = cap.name.split("#")[0].rpartition(".")[0] + "."
    return [m.removeprefix(parent) for m in cap.members[1:]]


def capture_report(caps: dict[str, Capture], window: int) -> dict:
    """{"overall", "histogram", "layers", "captures"} of the report (module doc). Inputs that
    are model parameters stay out of the overall and per-layer pools: they are constants a
    deployment precomputes, and their weight would depend on the batch size."""
    entries = []
    for cap in caps.values():
        values, freq = histogram_of(cap)
        entries.append({"name": cap.name, "layer": layer_of(cap.name),
                        "target": cap.target, "shares": _shares(cap),
                        "input": "parameter" if cap.parameter else "activation",
                        "rows": cap.rows, "features": cap.fired.numel(),
                        **firing_stats(values, freq, window, cap.fired.cpu())})
    text = [c for c in caps.values() if not c.parameter]
    hists = [histogram_of(c) for c in text]
    # The fixed-range histogram (values -32..32, under/overflow) of the pooled counts.
    pooled = spike_stats_from_histogram(torch.cat([h[0] for h in hists]),
                                        torch.cat([h[1] for h in hists]), "ternary", window,
                                        HIST_RANGE)["histogram"]
    layers = sorted({layer_of(c.name) for c in text} - {None})
    return {"overall": _pooled(text, window), "histogram": pooled,
            "layers": [{"layer": i, **_pooled([c for c in text if layer_of(c.name) == i], window)}
                       for i in layers],
            "captures": entries}


# --------------------------------------------------------------------------- the analysis


def default_out(checkpoint: str) -> str:
    """`RUN_DIR/analysis/step_NNNNNNNN/spikes` for a training checkpoint (a run directory stands
    for its newest one): outside `checkpoints/`, so pruning the checkpoint keeps the analysis;
    `DIR/spikes` for a converted directory."""
    if os.path.isfile(os.path.join(checkpoint, "config.json")):
        return os.path.join(os.path.abspath(checkpoint), "spikes")
    path = os.path.abspath(resolve_checkpoint(checkpoint))
    folder, step = os.path.split(path)
    run_dir = os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else folder
    return os.path.join(run_dir, "analysis", step, "spikes")


def _describe(data, data_path, seed) -> dict:
    return {"source": "--data" if data_path else "training run", "name": data.name,
            "paths": [data.path] if data.path else [s.path for s in data.sources],
            "seq_len": data.seq_len, "seed": seed}


def _json_safe(obj):
    """NaN/inf -> None, recursively, so the report is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def analyze(checkpoint: str, *, data_path: str | None = None, samples: int = 8,
            seq_len: int | None = None, k: float | None = None, window: int = 3,
            device: str | torch.device = "cpu", seed: int = 0, batch_size: int = 8,
            raster: str | None = None, neurons: int = 64, tokens: int = 8):
    """Runs the firing analysis (module doc). Returns (report dict, raster) where raster is
    {"capture": name, "counts": int64 [tokens, neurons] CPU, "rows": [start, stop]}: the counts
    of `tokens` consecutive rows (mid first sample) and the first `neurons` features of capture
    `raster` (a projection name; default: the first attention input). Errors name the option."""
    if k is not None and not (isinstance(k, (int, float)) and math.isfinite(k) and k > 0):
        raise ValueError(f"--k must be a positive number, got {k}")
    for option, value in (("--samples", samples), ("--batch-size", batch_size), ("--window", window),
                          ("--neurons", neurons), ("--tokens", tokens)):
        if value < 1:
            raise ValueError(f"{option} must be >= 1, got {value}")
    loaded = load_model(checkpoint, device, spike=False)
    model, cfg = loaded.model, loaded.model_cfg
    spike = dataclasses.replace(cfg.spike, enabled=True, k=float(k if k is not None else cfg.spike.k))
    names = capture_names(model, spike.targets)
    if not names:
        raise ValueError(f"{loaded.path}: model.spike.targets {spike.targets} selects no projection")
    if raster is not None and raster.split("#")[0] not in names:
        raise ValueError(f"--raster {raster}: not a spiked projection of {loaded.path} "
                         f"(e.g. {sorted(names)[0]})")
    data = data_config(loaded, data_path, seq_len)
    batches = sample_batches(data, samples, batch_size=batch_size, seed=seed,
                             vocab_size=cfg.vocab_size)
    seq = batches[0]["input_ids"].shape[1]
    start = max((seq - tokens) // 2, 0)

    float_loss = evaluate_loss(model, batches)["loss"]
    handles = attach_spiking(model, spike)
    try:
        with SpikeCapture(model, spike, start, tokens, neurons) as cap:
            spiking_loss = evaluate_loss(model, batches)["loss"]
    finally:
        detach_spiking(model, handles)
    caps = cap.captures

    if raster is None:
        chosen = next((c for c in caps.values() if c.target == "attn"), next(iter(caps.values())))
    else:
        chosen = next((c for c in caps.values() if raster == c.name or raster in c.members), None)
        if chosen is None:
            raise ValueError(f"--raster {raster}: no capture reads it; captures: {list(caps)[:6]}...")
    if chosen.window is None:
        raise ValueError(f"--raster {chosen.name}: its input had no rows in the first batch")
    report = {
        "checkpoint": os.path.abspath(loaded.path), "model": cfg.name, "k": spike.k,
        "targets": list(spike.targets), "window": window, "samples": samples, "seq_len": seq,
        "tokens": sum(b["input_ids"].numel() for b in batches), "device": str(device),
        "data": _describe(data, data_path, seed),
        "loss": {"float": float_loss, "spiking": spiking_loss, "delta": spiking_loss - float_loss},
        **capture_report(caps, window),
    }
    counts = chosen.window.cpu().to(torch.int64)
    rows = [chosen.window_start, chosen.window_start + counts.shape[0]]
    report["raster"] = {"capture": chosen.name, "rows": rows, "neurons": [0, counts.shape[1]]}
    return report, {"capture": chosen.name, "counts": counts, "rows": rows}


def save_report(out: str, report: dict, raster: dict, *, overwrite: bool = False) -> dict:
    """Writes report.json and the figures into `out`, atomically (a temporary sibling renamed
    at the end; an existing `out` is refused unless `overwrite`). Returns the report as written
    (with "figures" and the raster's steps per coding)."""
    from .spike_figures import write_figures

    out = os.path.abspath(out)
    with atomic_output_dir(out, overwrite) as tmp:
        drawn = write_figures(tmp, report, raster)
        steps = {d["coding"]: d["steps"] for d in drawn.values() if "coding" in d}
        report = {**report, "out": out, "figures": sorted(drawn),
                  "raster": {**report["raster"], "steps": steps}}
        with open(os.path.join(tmp, REPORT_FILE), "w") as f:
            json.dump(_json_safe(report), f, indent=1, allow_nan=False)
            f.write("\n")
    return report
