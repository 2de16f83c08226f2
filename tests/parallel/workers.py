"""What the ranks of the simulated clusters run (importable by spawned processes)."""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from data.config import DataConfig
from parallel import Mesh, ParallelConfig
from parallel.compile import compiled_regions
from parallel.materialize import local
from tests.helpers import model_config, stop_after
from train import RunConfig, build
from train.config import TrainConfig


def make_config(spec: dict) -> RunConfig:
    """spec: model (conf/model name), model_overrides, data / train / parallel (kwargs)."""
    return RunConfig(model=model_config(spec["model"], **spec.get("model_overrides", {})),
                     parallel=ParallelConfig(**spec.get("parallel", {})), data=DataConfig(**spec["data"]),
                     train=TrainConfig(**spec["train"]))


def full_params(model: torch.nn.Module, main: bool) -> dict | None:
    """Every parameter at full size (a collective under the sharded engine), on the main rank."""
    out = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if isinstance(p, DTensor) else p
        out[name] = full.detach().clone()
    return out if main else None


def train(spec: dict) -> dict:
    """Builds (resuming when spec's run dir has a checkpoint) and trains. spec["stop_after"]:
    stop (and save) after that step as a stop signal would. Returns losses, the final step and,
    on the main rank, the parameters before and after training."""
    cfg = make_config(spec)
    mesh = Mesh(cfg.parallel, "cpu")
    trainer = build(cfg, mesh)
    # the first rank of each pipeline stage (of the whole world without pipeline parallelism)
    main = mesh.coordinate("dp_sp") == 0
    initial = full_params(trainer.model, main)
    if spec.get("stop_after") is not None:
        stop_after(trainer, spec["stop_after"])
    try:
        rows = trainer.fit()
    finally:
        trainer.loader.close()
    return {"losses": [r["loss"] for r in rows], "steps": [r["step"] for r in rows], "step": trainer.step,
            "expert_load": [r.get("expert_load") for r in rows],
            "local_param_bytes": sum(local(p).numel() * p.element_size() for p in trainer.model.parameters()),
            "stage": mesh.zero_stage, "initial": initial, "params": full_params(trainer.model, main),
            "compiled": compiled_regions(trainer.model), "two_level": two_level(mesh, trainer.model)}


def two_level(mesh: Mesh, model: torch.nn.Module) -> dict:
    """The axes whose groups span virtual nodes, the FSDP2 units reducing in two levels and the
    MoE layers sending tokens in two levels (private FSDP2 state: tests only)."""
    from parallel.engine import TwoLevelReduceScatter

    units = [m for m in model.modules() if hasattr(m, "_get_fsdp_state")]
    return {"axes": sorted(a for a in ("shard", "ep", "expert_shard") if mesh.levels(a) is not None),
            "units": sum(isinstance(g._reduce_scatter_comm, TwoLevelReduceScatter)
                         for u in units for g in u._get_fsdp_state()._fsdp_param_groups),
            "dispatchers": sum(getattr(getattr(m, "dispatcher", None), "levels", None) is not None
                               for m in model.modules())}


def merged(results: list[dict]) -> dict:
    """Every rank's result of `train` -> the first rank's, with the parameters ("initial",
    "params") of all pipeline stages."""
    out = dict(results[0])
    for key in ("initial", "params"):
        out[key] = {k: v for r in results if r[key] for k, v in r[key].items()}
    return out


def train_many(specs: list[dict]) -> list[dict]:
    return [train(spec) for spec in specs]
