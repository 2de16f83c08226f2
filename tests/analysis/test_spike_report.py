"""Firing analysis (analysis/spike_report.py, analysis/spike_figures.py): captured counts agree with
the spiking op applied independently, shared inputs are recorded once, every coding is reported,
the raster draws exactly the captured counts."""
import json
import os

import pytest
import torch

from model import build_model
from model.config import SpikeConfig
from model.spike_coding import (CODINGS, all_spike_stats, decode, spike_stats,
                                spike_stats_from_histogram, steps_needed)
from model.spiking import attach_spiking, projections
from ops.spike import spike_quantize
from tests.helpers import model_config, train_tiny
from analysis.evaluate import data_config, evaluate_loss, load_model, sample_batches
from analysis.spike_figures import raster_image, write_figures
from analysis.spike_report import (analyze, capture_names, firing_stats, save_report,
                                two_populations)

SMALL = dict(samples=3, seq_len=32, batch_size=2, neurons=16, tokens=5)


@pytest.fixture(scope="module")
def sb7b(tiny_run):
    report, raster = analyze(tiny_run, k=2.0, **SMALL)
    return report, raster


@pytest.fixture(scope="module")
def sb76b(tiny_run, tmp_path_factory):
    # Reuse the session run's demo corpus cache: training the MoE model then takes seconds.
    run = train_tiny(str(tmp_path_factory.mktemp("sb76b") / "run"),
                     os.path.join(os.path.dirname(tiny_run), "cache"), model="sb76b-tiny", steps=2)
    return run, *analyze(run, **SMALL)


def by_name(report):
    return {c["name"]: c for c in report["captures"]}


def without_extras(stats):
    return {k: v for k, v in stats.items() if k not in ("coding", "window", "histogram")}


def test_first_attention_input_matches_the_spiking_op(tiny_run, sb7b):
    """Layer 0's attention input is norm(embed(ids)): recompute its counts without any hook."""
    report, raster = sb7b
    loaded = load_model(tiny_run, spike=False)
    model = loaded.model
    batches = sample_batches(data_config(loaded, seq_len=32), 3, batch_size=2, seed=0,
                             vocab_size=loaded.model_cfg.vocab_size)
    with torch.no_grad():
        per_batch = [spike_quantize(model.layers[0].attn_norm(model.embeddings(b["input_ids"])), 2.0,
                                    return_counts=True).counts.reshape(-1, 128) for b in batches]
    counts = torch.cat(per_batch)
    cap = by_name(report)["layers.0.attn.q_proj"]
    assert cap["rows"] == counts.shape[0] == report["tokens"] == 3 * 32
    assert cap["numel"] == counts.numel() and cap["features"] == 128
    assert cap["le7"] == pytest.approx(float((counts.abs() <= 7).double().mean()))
    assert cap["silent_share"] == pytest.approx(float((counts == 0).double().mean()))
    assert cap["mean_abs"] == pytest.approx(float(counts.abs().double().mean()))
    assert cap["dead_channels"] == int((counts != 0).sum(0).eq(0).sum())
    direct = all_spike_stats(counts, window=3)
    for c in ("ternary", "bitwise", "twos_complement"):
        assert cap["codings"][c] == pytest.approx(without_extras(direct[c]))
    split = torch.cat([counts.clamp(min=0), (-counts).clamp(min=0)])
    assert cap["codings"]["binary"] == pytest.approx(
        {**without_extras(spike_stats(split, "binary")), "populations": 2})
    # The raster window: `tokens` rows from the middle of the first sample, first `neurons` features.
    start, stop = raster["rows"]
    assert raster["capture"] == "layers.0.attn.q_proj" and stop - start == 5
    assert torch.equal(raster["counts"], per_batch[0][start:stop, :16].to(torch.int64))


def test_losses_match_the_model_with_and_without_spiking(tiny_run, sb7b):
    report, _ = sb7b
    loaded = load_model(tiny_run, spike=False)
    batches = sample_batches(data_config(loaded, seq_len=32), 3, batch_size=2, seed=0,
                             vocab_size=loaded.model_cfg.vocab_size)
    float_loss = evaluate_loss(loaded.model, batches)["loss"]
    attach_spiking(loaded.model, SpikeConfig(enabled=True, k=2.0))
    spiking_loss = evaluate_loss(loaded.model, batches)["loss"]
    assert report["loss"] == pytest.approx(
        {"float": float_loss, "spiking": spiking_loss, "delta": spiking_loss - float_loss})
    assert report["k"] == 2.0 and report["model"] == "sb7b-tiny"


def test_shared_inputs_are_recorded_once(sb7b):
    caps = by_name(sb7b[0])
    assert caps["layers.0.attn.q_proj"]["shares"] == ["k_proj", "v_proj", "gk_proj.0"]  # GLA
    assert caps["layers.1.attn.q_proj"]["shares"] == ["k_proj", "v_proj"]  # SWA
    assert caps["layers.0.mlp.gate_proj"]["shares"] == ["up_proj"]
    assert caps["layers.0.attn.gk_proj.1"]["shares"] == []
    assert not any(n.endswith(("k_proj", "v_proj", "up_proj")) for n in caps)
    # Every spiked projection is accounted for, exactly once.
    members = [m for n, c in caps.items()
               for m in [n] + [n.rpartition(".")[0] + "." + s for s in c["shares"]]]
    cfg = model_config("sb7b-tiny")
    assert sorted(members) == sorted(capture_names(build_model(cfg), cfg.spike.targets))


def test_selection_is_what_attach_spiking_hooks():
    for name in ("sb7b-tiny", "sb76b-tiny"):
        cfg = model_config(name)
        targets = ["attn", "mlp", "experts", "router", "head"]
        model = build_model(cfg)
        attach_spiking(model, SpikeConfig(enabled=True, targets=targets))
        hooked = {n for n, m in model.named_modules() if m._forward_pre_hooks}
        assert set(projections(model, targets)) == hooked


def test_every_coding_reported_and_ranges(sb7b, tmp_path):
    report, raster = sb7b
    for entry in [report["overall"], *report["layers"], *report["captures"]]:
        assert set(entry["codings"]) == set(CODINGS)
        assert entry["codings"]["binary"]["populations"] == 2
        assert entry["codings"]["binary"]["numel"] == 2 * entry["numel"]
        for c in CODINGS:
            assert 0.0 <= entry["codings"][c]["sparsity"] <= 1.0
            assert 0.0 <= entry["codings"][c]["firing_rate"] <= 1.0
        assert 0.0 <= entry["le7"] <= 1.0 and 0.0 <= entry["dead_fraction"] <= 1.0
    assert report["overall"]["numel"] == sum(c["numel"] for c in report["captures"])
    assert [e["layer"] for e in report["layers"]] == [0, 1, 2, 3]
    hist = report["histogram"]
    assert hist["values"] == list(range(-32, 33))
    assert sum(hist["counts"]) + hist["underflow"] + hist["overflow"] == report["overall"]["numel"]
    written = save_report(str(tmp_path / "out"), report, raster)
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())  # strict JSON
    assert on_disk["figures"] == written["figures"] and "layers.png" in on_disk["figures"]
    assert on_disk["raster"]["steps"]["bitwise"] >= 1


def test_raster_draws_the_captured_counts(sb7b, tmp_path):
    report, raster = sb7b
    drawn = write_figures(str(tmp_path), report, raster)
    counts = raster["counts"]
    tokens, n = counts.shape
    for c in CODINGS:
        data = drawn[f"raster_{c}.png"]
        image, T = data["image"], data["steps"]
        pos, neg = counts.clamp(min=0), (-counts).clamp(min=0)
        need = max(steps_needed(pos, c), steps_needed(neg, c)) if c == "binary" else steps_needed(counts, c)
        assert T == max(need, 1)  # one common T per coding
        assert image.shape == ((2 if c == "binary" else 1) * n, tokens * T)
        for j in range(tokens):
            train = image[:, j * T:(j + 1) * T].T  # [T, rows]
            if c == "binary":
                got = decode(train[:, :n], c) - decode(-train[:, n:], c)
            else:
                got = decode(train, c)
            assert torch.equal(got, counts[j])
        assert (tmp_path / f"raster_{c}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert raster_image(torch.zeros(2, 3, dtype=torch.int64), "bitwise")["steps"] == 1


def test_histogram_statistics_match_tensor_statistics():
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(500, generator=g) * 6).round().to(torch.int64)
    values, freq = torch.unique(s, return_counts=True)
    # Split in two overlapping halves with zero bins: repeats are summed, zeros ignored.
    v2 = torch.cat([values, values, torch.tensor([99])])
    f2 = torch.cat([freq // 2, freq - freq // 2, torch.tensor([0])])
    for c in ("ternary", "bitwise", "twos_complement"):
        assert spike_stats_from_histogram(v2, f2, c, 3, (-8, 8)) == spike_stats(s, c, 3, (-8, 8))
    with pytest.raises(ValueError, match="negative"):
        spike_stats_from_histogram(values, freq, "binary")
    stats = firing_stats(*two_populations(values, freq), 3)
    assert stats["codings"]["binary"]["numel"] == 2 * stats["numel"] == 2000


def test_mixture_of_experts_and_hybrid_mixers(sb76b):
    _, report, raster = sb76b
    caps = by_name(report)
    tokens = report["tokens"]
    experts = caps["layers.1.mlp.experts.gate_proj"]
    assert experts["target"] == "experts" and experts["shares"] == ["up_proj"]
    assert experts["rows"] == tokens  # top-1 routing: one row per token
    hidden = caps["layers.1.mlp.experts.down_proj"]
    assert hidden["rows"] == tokens and hidden["features"] == 384
    assert caps["layers.1.mlp.shared.gate_proj"]["shares"] == ["up_proj"]
    # The hybrid layers' k/v projections also project the learned sink tokens: a separate
    # capture, kept out of the pooled statistics.
    sinks = caps["layers.1.attn.k_proj#1"]
    assert sinks["input"] == "parameter" and sinks["shares"] == ["v_proj"]
    assert sinks["rows"] == 8 * 2  # 8 sinks, once per forward (2 batches)
    text = [c for c in report["captures"] if c["input"] == "activation"]
    assert report["overall"]["numel"] == sum(c["numel"] for c in text)
    assert raster["capture"] == "layers.0.attn.q_proj"


def test_raster_by_shared_or_expert_name(sb76b):
    run = sb76b[0]
    _, raster = analyze(run, raster="layers.1.attn.v_proj", **SMALL)
    assert raster["capture"] == "layers.1.attn.q_proj"
    _, raster = analyze(run, raster="layers.3.mlp.experts.down_proj", **SMALL)
    assert raster["capture"] == "layers.3.mlp.experts.down_proj" and raster["counts"].shape[1] == 16


@pytest.mark.parametrize("kwargs, message", [
    (dict(raster="layers.0.attn.nope"), "--raster layers.0.attn.nope"),
    (dict(raster="lm_head"), "--raster lm_head"),  # not spiked by default
    (dict(k=0.0), "--k"),
    (dict(k=float("nan")), "--k"),
    (dict(window=0), "--window"),
    (dict(samples=0), "--samples"),
])
def test_bad_settings_are_named(tiny_run, kwargs, message):
    with pytest.raises(ValueError, match=message):
        analyze(tiny_run, **{**SMALL, **kwargs})
