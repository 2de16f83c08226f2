"""`build(cfg)`: mesh -> model -> parallelize -> data -> trainer, and the dry-run summary."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

import torch
import yaml

from data import build_loader
from model import build_model
from model.decoder import init_part
from parallel import Mesh, comm, parallelize
from parallel.materialize import init_weights, materialize
from parallel.plan import check_fits, format_plan, plan_memory
from parallel.sequence import check_sequence_parallel
from .checkpoint import checkpoints_dir
from .config import RunConfig
from .init import continue_data, load_init_from
from .manifest import write_file
from .optim import build_optimizer
from .resume import check_model_config, check_unused_run_dir, resolve_resume
from .trainer import Trainer, batch_split

log = logging.getLogger("train")


def run(cfg: RunConfig) -> dict:
    """Dry run (meta-device summary) or a full training run. Returns the summary or last metrics."""
    mesh = Mesh(cfg.parallel, cfg.train.device)
    try:
        if mesh.is_main:
            log.info("run directory %s", os.path.abspath(cfg.train.run_dir))
        if cfg.train.dry_run:
            return dry_run(cfg, mesh)
        trainer = build(cfg, mesh)
        try:
            rows = trainer.fit()
        finally:
            trainer.loader.close()  # stops the prefetch thread
        return rows[-1] if rows else {}
    finally:
        mesh.close()


def build(cfg: RunConfig, mesh: Mesh) -> Trainer:
    """The trainer, every check passed, resumed when there is a checkpoint to resume from. The
    run directory is written (config.yaml, train.overwrite) only once all checks have passed."""
    t = cfg.train
    batch_split(t, mesh.dp)  # before anything is read or allocated
    check_sequence_parallel(cfg)
    check_memory(cfg, mesh)
    check_run_dir(t.run_dir)
    loader = build_loader(cfg.data, seed=t.seed, global_batch=t.global_batch,
                          dp_rank=mesh.dp_rank, dp_size=mesh.dp)
    loader.check_vocab(cfg.model.vocab_size)  # token ids the embedding cannot look up
    resume_from = resolve_resume(cfg)
    if resume_from:
        check_model_config(resume_from, cfg.model)  # before allocating anything
    elif t.resume == "never" and not t.overwrite:
        check_unused_run_dir(t)
    full = build_model(cfg.model, device="meta")
    counts = full.num_params()
    engine = parallelize(full, mesh, cfg)  # shards the meta model: no rank holds full weights
    model = engine.module  # the decoder, or this rank's pipeline stage of it
    materialize(model, torch.device("cpu") if engine.offload else mesh.device)
    if resume_from:  # filled with this rank's rows by trainer.resume below
        if t.init_from and mesh.is_main:
            log.info("train.init_from=%s ignored: resuming from %s", t.init_from, resume_from)
    elif t.init_from:
        source, tensors = load_init_from(model, t.init_from, cfg.model, mesh.world_group)
        if mesh.is_main:
            log.info("initialised from %s (%d tensors)", source, tensors)
    else:
        # the same full model on every rank and for every layout
        init_weights(model, lambda part: init_part(part, cfg.model.init_std), mesh.device, seed=t.seed)
    if mesh.is_main:
        log.info("model %s: %s parameters (%s active) on %s, world %d, ZeRO stage %d, recompute %s%s",
                 cfg.model.name, f"{counts['total']:,}", f"{counts['active']:,}", mesh.device,
                 mesh.world_size, mesh.zero_stage, t.recompute,
                 f", pipeline stages {engine.pipeline.bounds}" if engine.pipeline else "")
    optimizer = build_optimizer(model, t)
    trainer = Trainer(cfg, mesh, engine, optimizer, loader)
    if resume_from:
        trainer.resume(resume_from)
        if t.data_from and mesh.is_main:
            log.info("train.data_from=%s ignored: resuming from %s", t.data_from, resume_from)
    elif t.data_from:
        source = continue_data(trainer, t.data_from)
        if mesh.is_main:
            log.info("data stream continued from %s (%s tokens before this run)", source, f"{trainer.tokens_seen:,}")
    on_main(mesh, lambda: start_run_dir(cfg, trainer, resumed=bool(resume_from)))
    return trainer


def on_main(mesh: Mesh, work) -> None:
    """Runs `work()` on rank 0 only; when it raises a ValueError (a run directory it cannot
    write), every rank raises one at once instead of waiting for rank 0 in the first collective."""
    error = None
    if mesh.is_main:
        try:
            work()
        except ValueError as e:
            error = str(e)
    error = comm.broadcast_object(error, mesh.world_group)
    if error is not None:
        raise ValueError(error if mesh.is_main else f"rank 0 stopped the run: {error}")


def check_run_dir(run_dir: str) -> None:
    """Refuses a train.run_dir that is a file or that cannot be written (a read-only filesystem,
    permissions), before anything is read or written."""
    path = os.path.abspath(run_dir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise ValueError(f"train.run_dir={run_dir}: {path} is a file, not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"train.run_dir={run_dir}: {path} is not writable (a read-only filesystem or its permissions)")


def start_run_dir(cfg: RunConfig, trainer: Trainer, resumed: bool) -> None:
    """Rank 0, once every check has passed: writes config.yaml; a fresh run then deletes the
    earlier run's checkpoints and metrics (train.overwrite) or drops the rows of an attempt
    stopped before its first checkpoint (train.resume=auto without one)."""
    t = cfg.train
    write_config(cfg)
    if resumed:
        return
    if not t.overwrite:
        trainer.metrics.drop_rows_after(0)
        return
    old = [p for p in (checkpoints_dir(t.run_dir), trainer.metrics.path) if os.path.exists(p)]
    for path in old:
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    if old:
        log.warning("train.overwrite=true: deleted %s of the earlier run", ", ".join(old))


def write_config(cfg: RunConfig) -> None:
    write_run_file(cfg.train.run_dir, "config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def write_run_file(run_dir: str, name: str, text: str) -> str:
    """Writes run_dir/NAME atomically, creating run_dir; returns its path. ValueError naming
    train.run_dir when the filesystem refuses (read-only, full, not a directory)."""
    path = os.path.join(run_dir, name)
    try:
        os.makedirs(run_dir, exist_ok=True)
        write_file(path, text.encode(), atomic=True)
    except OSError as e:
        raise ValueError(f"train.run_dir={run_dir}: cannot write {path} ({e})") from None
    return path


def check_memory(cfg: RunConfig, mesh: Mesh) -> None:
    """On CUDA, refuses a run whose planned peak (parallel/plan.py) exceeds the GPU's memory,
    before anything is allocated, naming the settings that lower it."""
    if mesh.device.type != "cuda" or not cfg.train.check_memory:
        return
    plan = plan_memory(cfg, mesh.dp, "cuda")  # under pipeline parallelism: the stage with the highest peak
    try:
        check_fits(plan, torch.cuda.get_device_properties(mesh.device).total_memory)
    except ValueError as e:
        raise ValueError(f"{e}. (train.check_memory=false skips this check.)") from None
    if mesh.is_main:
        log.info("memory plan: peak %.1f GiB per GPU (train.recompute=%s)", plan.peak / 2**30, plan.recompute)


def dry_run(cfg: RunConfig, mesh: Mesh) -> dict:
    """Builds the model on the meta device (no memory), plans the memory of a step on this
    run's device (parallel/plan.py), prints and writes `summary.json`."""
    model = build_model(cfg.model, device="meta")
    counts = model.num_params()
    m = cfg.model
    plan = plan_memory(cfg, mesh.dp, mesh.device.type)
    summary = {
        "model": m.name,
        "params_total": counts["total"],
        "params_active": counts["active"],
        "layers": [f"{mix}/{ffn}" for mix, ffn in zip(m.mixers, m.ffns)],
        "world_size": mesh.world_size,
        "parallel": {"dp": mesh.dp, "pp": mesh.pp, "ep": mesh.ep, "sp": mesh.sp},
        "tokens_per_step": cfg.train.global_batch * cfg.data.seq_len,
        "memory": plan.to_dict(),
    }
    if mesh.is_main:
        # config.yaml stays the training run's: a dry run into a run directory changes nothing of it
        path = write_run_file(cfg.train.run_dir, "summary.json",
                              json.dumps({**summary, "config": dataclasses.asdict(cfg)}, indent=2))
        print(format_summary(summary) + "\n\n" + format_plan(plan)
              + f"\n\nsummary written to {os.path.abspath(path)}", flush=True)
    return summary


def format_summary(s: dict) -> str:
    plan, runs = [], []
    for layer in s["layers"]:  # run-length encode the plan: "gla/dense, swa/dense x 14"
        if runs and runs[-1][0] == layer:
            runs[-1][1] += 1
        else:
            runs.append([layer, 1])
    plan = ", ".join(f"{name} x{n}" if n > 1 else name for name, n in runs)
    return "\n".join([
        f"model            {s['model']}",
        f"parameters       {s['params_total']:,} total ({_human(s['params_total'])})",
        f"active per token {s['params_active']:,} ({_human(s['params_active'])})",
        f"layer plan       {plan}",
        f"parallel         {s['parallel']} (world {s['world_size']})",
        f"tokens per step  {s['tokens_per_step']:,}",
    ])


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"

