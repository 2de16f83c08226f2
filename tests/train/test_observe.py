"""What a run shows while it goes: the balance loss and firing rates in metrics rows (checked
against the model's own numbers), their log window across a resume, the progress bar, and
Weights & Biases offline runs read back from their files."""
import glob
import io
import json
import logging
import os
import sys
from collections import defaultdict

import pytest
import torch

from data import build_loader
from data.config import DataConfig
from model.context import SequenceContext
from model.moe import Experts
from model.spiking import projections, target_of
from ops.spike import spike_quantize
from parallel import Mesh, ParallelConfig
from tests.helpers import model_config, stop_after
from train import RunConfig, build, run
from train.config import TrainConfig
from train.progress import Progress, shown
from train.wandb_log import numbers

SPIKE = {"enabled": True, "k": 3.0, "targets": ["attn", "mlp", "experts"]}


@pytest.fixture(scope="module")
def data_cfg(tmp_path_factory):
    return DataConfig(seq_len=64, demo_chars=200_000, vocab_size=512,
                      cache_dir=str(tmp_path_factory.mktemp("cache")))


def make_cfg(data_cfg, run_dir, model="sb76b-tiny", spike=True, moe=None, **train):
    """moe: model.moe settings (all of them) in place of the model's."""
    base = dict(max_steps=2, global_batch=4, lr=3e-3, warmup_steps=2, log_every=1, run_dir=str(run_dir), seed=7)
    base.update(train)
    overrides = {"spike": {**SPIKE, "enabled": spike}, **({"moe": moe} if moe else {})}
    return RunConfig(model=model_config(model, **overrides), data=data_cfg, train=TrainConfig(**base))


def fit(cfg) -> list[dict]:
    trainer = build(cfg, Mesh(ParallelConfig(), "cpu"))
    try:
        return trainer.fit()
    finally:
        trainer.loader.close()


class Counted:
    """Counts the spikes of every spiked input of `model` the way the quantiser makes them, from
    hooks of its own (prepended: they see the input before it is spiked)."""

    def __init__(self, model, k: float):
        self.k, self.sums = k, defaultdict(lambda: [0, 0, 0])  # (layer, target) -> numel, zeros, sum |s|
        self.handles, self.hidden = [], {}
        for name, module in projections(model, SPIKE["targets"]).items():
            layer = int(name.split(".")[1]) if name.startswith("layers.") else None
            target = "experts" if isinstance(module, Experts) else target_of(name)
            self.handles.append(module.register_forward_pre_hook(
                lambda m, args, key=(layer, target): self.add(key, args[0]), prepend=True))
            if isinstance(module, Experts):
                self.hidden[module] = module.hidden_fn
                module.hidden_fn = lambda h, key=(layer, target), fn=module.hidden_fn: (self.add(key, h), fn(h))[1]

    def add(self, key, x):
        counts = spike_quantize(x.detach(), self.k, return_counts=True).counts
        s = self.sums[key]
        s[0] += counts.numel()
        s[1] += int((counts == 0).sum())
        s[2] += int(counts.abs().sum())

    def remove(self):
        for h in self.handles:
            h.remove()
        for module, fn in self.hidden.items():
            module.hidden_fn = fn

    def rates(self) -> tuple[dict, dict, dict]:
        """(firing rate by target, mean |s| by target, {(layer, target): firing rate})."""
        by_target = defaultdict(lambda: [0, 0, 0])
        for (_, target), s in self.sums.items():
            by_target[target] = [a + b for a, b in zip(by_target[target], s)]
        return ({t: 1 - s[1] / s[0] for t, s in by_target.items()}, {t: s[2] / s[0] for t, s in by_target.items()},
                {key: 1 - s[1] / s[0] for key, s in self.sums.items() if key[0] is not None})


def test_balance_loss_and_firing_rates_are_the_models_own(data_cfg, tmp_path, caplog):
    """Row 1 holds the balance loss of the first global batch (routed over all micro-batches)
    and the spike statistics of its forward, both computed here from the initial model on the
    same batch; a no_grad forward (the routing pass, the reference forward here) is not counted."""
    cfg = make_cfg(data_cfg, tmp_path / "run", max_steps=1, micro_batch=2)
    trainer = build(cfg, Mesh(ParallelConfig(), "cpu"))
    loader = build_loader(cfg.data, seed=cfg.train.seed, global_batch=cfg.train.global_batch)
    batch = loader.next_batch()  # the trainer's first batch
    loader.close()
    ctx = SequenceContext.from_position_ids(batch["position_ids"])
    counted = Counted(trainer.model, SPIKE["k"])
    with torch.no_grad():
        out = trainer.model(batch["input_ids"], labels=batch["labels"], ctx=ctx)
    counted.remove()
    balance = float(sum(s.balance_loss() for s in out.router))
    rate, spikes, by_layer = counted.rates()
    with caplog.at_level(logging.INFO, logger="train"):
        try:
            (row,) = trainer.fit()
        finally:
            trainer.loader.close()
    assert row["balance_loss"] == pytest.approx(balance, rel=1e-5)
    assert set(row["firing_rate"]) == {"attn", "mlp", "experts"}
    assert row["firing_rate"] == pytest.approx(rate, abs=2e-3) and row["spike_count"] == pytest.approx(spikes, abs=5e-3)
    layers = row["firing_rate_layers"]
    assert len(layers) == cfg.model.num_layers
    assert {(i, t): r for i, entry in enumerate(layers) for t, r in entry.items()} == pytest.approx(by_layer, abs=2e-3)
    assert set(layers[0]) == {"attn", "mlp"} and set(layers[1]) == {"attn", "experts"}  # dense / MoE layers
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("step 1/1"))
    assert f"balance {row['balance_loss']:.4g}" in line and f"experts {row['firing_rate']['experts']:.3f}" in line
    on_disk = json.loads(open(tmp_path / "run" / "metrics.jsonl").read().splitlines()[-1])
    assert on_disk["firing_rate"] == row["firing_rate"] and on_disk["balance_loss"] == row["balance_loss"]


def test_no_spiking_no_moe_no_fields(data_cfg, tmp_path):
    (row,) = fit(make_cfg(data_cfg, tmp_path / "a", "sb7b-tiny", spike=False, max_steps=1))
    assert not {"balance_loss", "firing_rate", "spike_count", "firing_rate_layers"} & set(row)
    (row,) = fit(make_cfg(data_cfg, tmp_path / "b", "sb7b-tiny", max_steps=1, firing_stats=False))
    assert "firing_rate" not in row


def test_a_resumed_run_logs_the_rows_of_an_uninterrupted_one(data_cfg, tmp_path):
    """The checkpoint at step 3 falls inside the logging window of step 5 (rows at 1 and 5): the
    balance-loss sum and the spike counts of steps 2-3 travel in it."""
    whole = fit(make_cfg(data_cfg, tmp_path / "whole", max_steps=5, log_every=5))[-1]
    cfg = make_cfg(data_cfg, tmp_path / "split", max_steps=5, log_every=5)
    trainer = build(cfg, Mesh(ParallelConfig(), "cpu"))
    stop_after(trainer, 3)
    try:
        assert [r["step"] for r in trainer.fit()] == [1]
    finally:
        trainer.loader.close()
    resumed = fit(cfg)[-1]
    assert resumed["step"] == whole["step"] == 5
    assert resumed["loss"] == pytest.approx(whole["loss"], rel=1e-9)
    assert resumed["balance_loss"] == pytest.approx(whole["balance_loss"], rel=1e-9)
    for k in ("firing_rate", "spike_count", "firing_rate_layers", "expert_load"):
        assert resumed[k] == whole[k], k


def ranks_rows(specs: list[dict]) -> list[list[dict]]:
    """On each spawned rank (tests.parallel.ranks): the rows of a run per spec."""
    out = []
    for spec in specs:
        cfg = make_cfg(DataConfig(**spec["data"]), spec["run_dir"], **spec["train"])
        cfg.parallel = ParallelConfig(**spec["parallel"])
        trainer = build(cfg, Mesh(cfg.parallel, "cpu"))
        try:
            out.append(trainer.fit())
        finally:
            trainer.loader.close()
    return out


def test_two_ranks_log_the_values_of_one(data_cfg, tmp_path):
    """Data-parallel and pipeline-parallel ranks each count their part: summed over the ranks,
    the balance loss (scaled as the engine averages gradients) and the spike statistics are
    those of one rank training the same global batch, for both balance modes."""
    from tests.parallel.ranks import run_ranks

    def train(balance):
        return dict(max_steps=2, micro_batch=1, wandb="disabled",
                    moe={"num_experts": 4, "top_k": 1, "num_shared": 1, "aux_loss_coef": 0.01, "balance": balance})

    layouts = [("global", "dp", {}), ("micro", "dp", {}), ("micro", "pp", {"pp": 2})]  # pp needs micro
    one = {b: fit(make_cfg(data_cfg, tmp_path / f"one-{b}", **train(b))) for b in ("global", "micro")}
    specs = [{"data": vars(data_cfg), "run_dir": str(tmp_path / f"{b}-{name}"), "train": train(b), "parallel": parallel}
             for b, name, parallel in layouts]
    for (balance, name, _), rows in zip(layouts, run_ranks(2, "tests.train.test_observe:ranks_rows", specs)[0]):
        assert [r["step"] for r in rows] == [r["step"] for r in one[balance]] == [1, 2]
        for want, got in zip(one[balance], rows):
            assert got["balance_loss"] == pytest.approx(want["balance_loss"], rel=1e-5), (balance, name)
            assert got["firing_rate"] == pytest.approx(want["firing_rate"], abs=1e-3), (balance, name)
            assert got["spike_count"] == pytest.approx(want["spike_count"], abs=1e-3), (balance, name)
    assert one["global"][0]["balance_loss"] != pytest.approx(one["micro"][0]["balance_loss"], rel=1e-4)


# ------------------------------------------------------------------------------ progress bar

class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("mode, is_main, tty, want", [
    ("auto", True, True, True), ("auto", True, False, False), ("on", True, False, True),
    ("off", True, True, False), ("on", False, True, False), ("auto", False, True, False)])
def test_bar_is_shown_on_rank_0_in_a_terminal_or_when_asked(mode, is_main, tty, want):
    assert shown(mode, is_main, Terminal() if tty else io.StringIO()) is want


def test_bar_shows_stage_steps_tokens_loss_and_log_lines_pass_through_tqdm(capsys):
    stream = Terminal()
    console = logging.StreamHandler(sys.stdout)
    logging.root.addHandler(console)
    try:
        bar = Progress("auto", True, max_steps=4, stage="8k", stream=stream)
        bar.start(1)  # a resumed run
        assert console not in logging.root.handlers  # replaced by tqdm's while the bar is shown
        for step in (2, 3, 4):
            bar.update(step, 1500 * step, 7.0 - step / 10)
            logging.getLogger("train").warning("line at step %d", step)
        bar.close()
        bar.close()
        assert console in logging.root.handlers
    finally:
        logging.root.removeHandler(console)
    text = stream.getvalue()
    assert "8k" in text and "4/4" in text and "loss 6.6000" in text and "tokens 6.00k" in text
    assert "line at step" not in text and capsys.readouterr().out.count("line at step") == 3


def test_no_bar_when_stderr_is_not_a_terminal(data_cfg, tmp_path, capfd):
    fit(make_cfg(data_cfg, tmp_path / "run", "sb7b-tiny", spike=False, max_steps=2, progress="auto"))
    err = capfd.readouterr().err
    assert "step/s" not in err and "s/step" not in err and "2/2" not in err


# ------------------------------------------------------------------------------ wandb

def wandb_records(path: str):
    """The protobuf records of a wandb run file (`run-ID.wandb`): a 7-byte header, then records
    in 32 KiB blocks, each with a 7-byte header (crc32, length, type: full, first, middle, last)."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", path
    pos, parts, block = 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's tail is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        body, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        parts = body if kind in (1, 2) else parts + body
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def wandb_run(run_dir, run_id: str) -> list[dict]:
    """[{"run_id", "project", "name", "config" keys, "history": {step: values}}] of each offline
    run folder (one per attempt) of `run_id` under run_dir/wandb, oldest first."""
    out = []
    for path in sorted(glob.glob(os.path.join(run_dir, "wandb", f"offline-run-*-{run_id}", f"run-{run_id}.wandb"))):
        got = {"history": {}}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                got.update(run_id=record.run.run_id, project=record.run.project, name=record.run.display_name,
                           config={item.key for item in record.run.config.update})
            elif kind == "history":
                got["history"][record.history.step.num] = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        out.append(got)
    return out


def test_wandb_offline_run_keeps_its_id_across_a_resume(data_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "run"
    cfg = make_cfg(data_cfg, run_dir, "sb76b-tiny", spike=False, max_steps=2, wandb="offline", wandb_name="tiny")
    rows = fit(cfg)
    run_id = (run_dir / "wandb" / "run_id").read_text()
    (first,) = wandb_run(run_dir, run_id)
    assert (first["run_id"], first["project"], first["name"]) == (run_id, "spikingbrain", "tiny")
    assert {"model", "train", "data", "parallel"} <= first["config"]
    assert sorted(first["history"]) == [1, 2]
    logged = first["history"][2]
    assert logged["loss"] == pytest.approx(rows[-1]["loss"]) and logged["tokens"] == rows[-1]["tokens"]
    moe = [i for i, f in enumerate(cfg.model.ffns) if f == "moe"]  # expert load per decoder layer
    assert logged[f"expert_load/layer_{moe[0]}"] == pytest.approx(max(rows[-1]["expert_load"][0]) * 4)

    cfg.train.max_steps = 3  # continues from the checkpoint of step 2
    fit(cfg)
    assert (run_dir / "wandb" / "run_id").read_text() == run_id
    runs = wandb_run(run_dir, run_id)
    assert len(runs) == 2 and runs[1]["run_id"] == run_id and sorted(runs[1]["history"]) == [3]

    cfg.train.overwrite = True  # a fresh start: a new wandb run
    fit(cfg)
    assert (run_dir / "wandb" / "run_id").read_text() != run_id


def test_wandb_failure_warns_once_and_training_goes_on(data_cfg, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "wandb").write_text("a file where wandb wants its folder")
    with caplog.at_level(logging.WARNING, logger="train"):
        rows = fit(make_cfg(data_cfg, run_dir, "sb7b-tiny", spike=False, max_steps=2, wandb="offline"))
    assert [r["step"] for r in rows] == [1, 2]
    warnings = [r.getMessage() for r in caplog.records if "wandb" in r.getMessage()]
    assert len(warnings) == 1 and "training continues without wandb" in warnings[0]


def test_wandb_mode_disabled_in_the_environment_wins(data_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run(make_cfg(data_cfg, tmp_path / "run", "sb7b-tiny", spike=False, max_steps=1, wandb="offline"))
    assert not (tmp_path / "run" / "wandb").exists()


def test_numbers_for_wandb():
    row = {"step": 3, "loss": 2.5, "stage": "8k", "flag": True, "expert_load": [[0.5, 0.5], [0.75, 0.25]],
           "firing_rate": {"attn": 0.4}, "firing_rate_layers": [{"attn": 0.3}, {"attn": 0.5, "mlp": 0.2}]}
    assert numbers(row, [1, 3]) == {"loss": 2.5, "expert_load/layer_1": 1.0, "expert_load/layer_3": 1.5,
                                    "firing_rate/attn": 0.4, "firing_rate_layers/layer_0/attn": 0.3,
                                    "firing_rate_layers/layer_1/attn": 0.5, "firing_rate_layers/layer_1/mlp": 0.2}


@pytest.mark.parametrize("setting, message", [
    ({"progress": "sometimes"}, "train.progress must be one of auto, on, off"),
    ({"wandb": "cloud"}, "train.wandb must be one of offline, online, disabled"),
    ({"wandb_project": ""}, "train.wandb_project"),
])
def test_bad_settings_name_the_setting(setting, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**setting)


def test_report_draws_the_training_firing_rates_and_balance_loss(data_cfg, tmp_path):
    from analysis.report import write_report

    run_dir = tmp_path / "run"
    rows = fit(make_cfg(data_cfg, run_dir, max_steps=3))
    result = write_report(str(run_dir))
    training = result["figures"]["firing"]["training"]
    assert set(training) == {"attn", "mlp", "experts"}
    assert training["mlp"] == ([1.0, 2.0, 3.0], [r["firing_rate"]["mlp"] for r in rows])
    assert result["figures"]["firing"]["reports"] == []  # no launch/spikes.py analysis here
    assert result["figures"]["expert_load"]["balance_loss"] == ([1.0, 2.0, 3.0], [r["balance_loss"] for r in rows])
    md = open(result["report"]).read()
    mean = sum(r["balance_loss"] for r in rows) / 3
    assert f"| balance loss | {mean:.4g} (mean of the last 3 rows) |" in md
    assert f"experts {rows[-1]['firing_rate']['experts']:.3f}" in md and "(firing_rates.png)" in md
