"""Multi-stage recipes (train/recipe.py): recipe=cpt-tiny end to end, a stop in the middle of a
stage and the restart, stage k starting from stage k-1's final weights and data stream,
train.init_from a training checkpoint, train.data_from, the errors; recipe=cpt-150b's plan."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from tests.helpers import ROOT, stop_after

sys.path.insert(0, os.path.join(ROOT, "launch"))
from launch.pretrain import compose_stage, load_run  # noqa: E402
from train.build import build, run  # noqa: E402
from train.checkpoint import CheckpointTensors, latest_checkpoint, read_state  # noqa: E402
from train.config import TrainConfig, from_dict  # noqa: E402
from train.optim import lr_at  # noqa: E402
from train.recipe import RecipeRunner, plan_stages  # noqa: E402

# cpt-tiny made smaller still: 6 + 4 + 4 steps
SMALL = ["recipe.stages.0.tokens=6144", "recipe.stages.1.tokens=4096", "recipe.stages.2.tokens=4096",
         "train.save_every=2", "train.log_every=1", "data.demo_chars=100000", "data.vocab_size=512"]


def cli(tmp_path, *extra):
    return ["+model=sb7b-tiny", "recipe=cpt-tiny", f"train.run_dir={tmp_path / 'run'}",
            f"data.cache_dir={tmp_path.parent / 'cache'}", "train.device=cpu", *SMALL, *extra]


def runner(args, run_stage=None):
    cfg, recipe = load_run(args)
    return RecipeRunner(recipe, args, compose_stage, run_stage)


def rows(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(checkpoint):
    return {k: v.clone() for k, v in CheckpointTensors(checkpoint).items()}


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """An uninterrupted cpt-tiny run (evaluation on, as the recipe has it)."""
    tmp = tmp_path_factory.mktemp("whole")
    state = runner(cli(tmp)).run()
    return tmp / "run", state


def test_three_stages_in_order_each_from_the_last(whole):
    run_dir, state = whole
    assert state["current"] is None
    assert [s["status"] for s in state["stages"]] == ["done"] * 3
    assert [s["max_steps"] for s in state["stages"]] == [6, 4, 4]
    assert [s["seq_len"] for s in state["stages"]] == [128, 256, 512]
    with open(run_dir / "recipe.json") as f:
        assert json.load(f)["stages"] == json.loads(json.dumps(state["stages"]))
    dirs = [run_dir / s["dir"] for s in state["stages"]]
    assert [d.name for d in dirs] == ["01-8k", "02-32k", "03-128k"]
    assert os.readlink(run_dir / "current") == os.path.join("stages", "03-128k")
    previous_tokens = 0
    for i, d in enumerate(dirs):
        final = latest_checkpoint(str(d))
        assert state["stages"][i]["final"] == os.path.relpath(final, run_dir)
        assert read_state(final)["step"] == state["stages"][i]["max_steps"]
        r = rows(d)
        assert {x["stage"] for x in r} == {state["stages"][i]["name"]}
        # the token count continues across stages: each stage's rows go on from the last one's
        per_step = state["stages"][i]["global_batch"] * state["stages"][i]["seq_len"]
        assert r[0]["tokens"] == previous_tokens + per_step
        previous_tokens = r[-1]["tokens"]
        # warm-up and decay relative to the stage: the first step warms up from lr / warmup steps
        with open(d / "config.yaml") as f:
            import yaml
            t = yaml.safe_load(f)["train"]
        assert t["max_steps"] == state["stages"][i]["max_steps"] and t["stage"] == state["stages"][i]["name"]
        tc = from_dict(TrainConfig, t)
        assert tc.warmup_steps == round(0.1 * tc.max_steps)
        assert [x["lr"] for x in r] == pytest.approx([lr_at(x["step"], tc) for x in r])
        assert r[-1]["lr"] == pytest.approx(t["lr"] * t["min_lr_ratio"])
        if i:  # from the previous stage's final weights, continuing its data
            prev = str(run_dir / state["stages"][i - 1]["final"])
            assert t["init_from"] == prev and t["data_from"] == prev
        # the long-context evaluation of the stage's final checkpoint
        with open(d / "eval" / f"step_{state['stages'][i]['max_steps']:08d}.json") as f:
            result = json.load(f)
        assert result["data"]["seq_len"] == state["stages"][i]["seq_len"]
        assert result["data"]["source"] == "held out"  # the documents of data.val_docs
        assert result["loss_by_position"] and str(state["stages"][i]["seq_len"]) in result["passkey"]


def test_stage_starts_from_the_previous_final_weights_and_data(tmp_path, whole):
    """Stage 2 built by hand from stage 1's final checkpoint: its weights before any step are
    stage 1's final ones, and its loader continues stage 1's document stream."""
    run_dir, state = whole
    final = str(run_dir / state["stages"][0]["final"])
    stages = plan_stages(runner(cli(tmp_path)).recipe, cli(tmp_path), compose_stage, "sb7b-tiny",
                         str(tmp_path / "run"))
    import dataclasses
    cfg = stages[1].cfg
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=final, data_from=final,
                                                             run_dir=str(tmp_path / "s2")))
    from parallel import Mesh
    mesh = Mesh(cfg.parallel, "cpu")
    trainer = build(cfg, mesh)
    saved = weights(final)
    for name, p in trainer.model.state_dict().items():
        assert torch.equal(p, saved[name]), name
    assert trainer.tokens_seen == read_state(final)["tokens_seen"]
    assert trainer.loader.state_dict() == read_state(final)["loader"]
    trainer.loader.close()
    mesh.close()


def test_stop_in_a_stage_and_restart_gives_the_same_run(tmp_path, whole):
    run_dir, state = whole
    args = cli(tmp_path)

    def stop_in_stage_two(cfg):
        if cfg.train.stage != "32k":
            return run(cfg)
        from parallel import Mesh
        mesh = Mesh(cfg.parallel, cfg.train.device)
        try:
            trainer = build(cfg, mesh)
            stop_after(trainer, 3)  # a stop signal after step 3 (save_every=2: the save is the stop's)
            trainer.fit()
            trainer.loader.close()
        finally:
            mesh.close()

    stopped = runner(args, stop_in_stage_two).run()
    assert [s["status"] for s in stopped["stages"]] == ["done", "stopped", "pending"]
    assert stopped["current"] == "32k"
    with open(tmp_path / "run" / "recipe.json") as f:
        assert json.load(f)["current"] == "32k"
    assert read_state(latest_checkpoint(str(tmp_path / "run" / "stages" / "02-32k")))["step"] == 3
    again = runner(args).run()  # the same command continues
    assert [s["status"] for s in again["stages"]] == ["done"] * 3
    for a, b in zip(state["stages"], again["stages"]):
        ra, rb = rows(run_dir / a["dir"]), rows(tmp_path / "run" / b["dir"])
        assert [(x["step"], x["loss"], x["tokens"], x["lr"]) for x in rb] == \
               [(x["step"], x["loss"], x["tokens"], x["lr"]) for x in ra]
    fa, fb = weights(str(run_dir / state["stages"][2]["final"])), weights(str(tmp_path / "run" / again["stages"][2]["final"]))
    for name in fa:
        assert torch.equal(fa[name], fb[name]), name
    # a finished recipe run again trains nothing
    assert runner(args).run()["stages"] == again["stages"]


def test_report_of_a_recipe_run(whole, tmp_path):
    from analysis.report import write_report
    run_dir, state = whole
    out = write_report(str(run_dir), str(tmp_path / "report"))
    s = out["summary"]
    assert s["steps"] == 14
    assert [(st["stage"], st["first"], st["last"]) for st in s["stages"]] == [("8k", 1, 6), ("32k", 7, 10), ("128k", 11, 14)]
    assert "loss_by_position" in out["figures"]


@pytest.mark.parametrize("extra, message", [
    (["train.max_steps=5"], "train.max_steps cannot be given with a recipe"),
    (["train.resume=never"], "train.resume=never"),
    (["recipe.stages.1.tokens=0"], "stage 32k: tokens must be > 0"),
    (["recipe.stages.0.warmup=1.5"], "warmup"),
])
def test_bad_recipe_settings_are_named(tmp_path, extra, message):
    with pytest.raises((ValueError, SystemExit), match=message):
        runner(cli(tmp_path, *extra))
    assert not (tmp_path / "run").exists()


def test_a_bad_stage_setting_names_the_stage(tmp_path):
    args = cli(tmp_path)
    _, recipe = load_run(args)
    recipe.stages[1].set["data.seq_len"] = 5
    with pytest.raises(ValueError, match="recipe cpt-tiny, stage 32k: data.seq_len"):
        plan_stages(recipe, args, compose_stage, "sb7b-tiny", str(tmp_path / "run"))
    recipe.stages[1].set["data.seq_len"] = 256
    recipe.stages[2].by_model["sb7b-tiny"] = {"train.lr": "fast"}
    with pytest.raises(ValueError, match="stage 128k: train.lr"):
        plan_stages(recipe, args, compose_stage, "sb7b-tiny", str(tmp_path / "run"))


def test_a_run_dir_of_another_recipe_or_changed_stage_is_refused(tmp_path, whole):
    run_dir, _ = whole
    args = cli(tmp_path)
    args[2] = f"train.run_dir={run_dir}"
    changed = [a for a in args if not a.startswith("recipe.stages.0.tokens")] + ["recipe.stages.0.tokens=8192"]
    with pytest.raises(ValueError, match="stage 8k finished with 6 steps"):
        runner(changed).run()
    other = args + ["recipe.stages.2.name=long"]
    with pytest.raises(ValueError, match="holds recipe cpt-tiny with stages"):
        runner(other).run()


def test_init_from_a_missing_training_checkpoint_is_named(tmp_path):
    cfg, _ = load_run(["+model=sb7b-tiny", f"train.run_dir={tmp_path / 'r'}", "train.max_steps=1",
                       f"train.data_from={tmp_path / 'nowhere'}", "data.demo_chars=100000",
                       "data.vocab_size=512", f"data.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(ValueError, match="train.data_from=.*not a training checkpoint"):
        run(cfg)


def test_cpt_150b_plans_the_reports_stages(tmp_path):
    """The full recipe's stages for sb7b and sb76b: lengths, tokens per step, steps, layouts."""
    for model, layouts in (("sb7b", ["sb7b-8k", "sb7b-32k", "sb7b-128k"]),
                           ("sb76b", ["sb76b-8k", "sb76b-32k", "sb76b-128k"])):
        args = [f"+model={model}", "recipe=cpt-150b", f"train.run_dir={tmp_path / model}"]
        r = runner(args)
        got = [(s.cfg.data.seq_len, s.cfg.train.global_batch * s.cfg.data.seq_len, s.cfg.train.max_steps)
               for s in r.stages]
        assert got == [(8192, 4194304, 23842), (32768, 4194304, 5961), (131072, 4194304, 5961)]
        assert sum(s.spec.tokens for s in r.stages) == 150e9
        assert [s.cfg.parallel.sp for s in r.stages] == ([1, 2, 8] if model == "sb7b" else [1, 4, 8])
        assert [f"parallel={name}" in s.overrides for s, name in zip(r.stages, layouts)] == [True] * 3
        assert [s.cfg.train.warmup_steps for s in r.stages] == [238, 119, 119]
    # the command line wins over every stage
    r = runner(["+model=sb7b", "recipe=cpt-150b", "train.lr=1e-5", "parallel=zero3",
                f"train.run_dir={tmp_path / 'cli'}"])
    assert {s.cfg.train.lr for s in r.stages} == {1e-5}
    assert {s.cfg.parallel.zero_stage for s in r.stages} == {3}


def test_torchrun_two_ranks_run_the_recipe(tmp_path, whole):
    """Two gloo ranks keep one process group for all stages and train like one rank (the
    uninterrupted run; the stage-end evaluation, off here, changes no training row)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    script = os.path.join(ROOT, "launch", "pretrain.py")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        script, *cli(tmp_path, "recipe.eval=false")], capture_output=True, text=True, env=env,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_dir, state = whole
    with open(tmp_path / "run" / "recipe.json") as f:
        two = json.load(f)
    assert [s["status"] for s in two["stages"]] == ["done"] * 3
    for a, b in zip(state["stages"], two["stages"]):
        ra, rb = rows(run_dir / a["dir"]), rows(tmp_path / "run" / b["dir"])
        assert [x["tokens"] for x in rb] == [x["tokens"] for x in ra]
        assert [x["loss"] for x in rb] == pytest.approx([x["loss"] for x in ra], rel=1e-5)
