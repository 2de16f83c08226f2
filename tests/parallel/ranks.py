"""Simulated clusters for tests: N gloo ranks as fresh processes on localhost.

`run_ranks(world, "module:function", payload)` spawns `world` processes with the environment
torchrun would give them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), calls
`function(payload)` in each and returns every rank's return value (a list ordered by rank).
Each rank uses one CPU thread, so 4 ranks fit a 2-core machine.
"""
from __future__ import annotations

import importlib
import os
import pickle
import socket
import tempfile
import time

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, target: str, payload, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    module, name = target.split(":")
    try:
        result = getattr(importlib.import_module(module), name)(payload)
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_ranks(world: int, target: str, payload=None, timeout: float = 600) -> list:
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_worker, args=(world, free_port(), target, payload, out_dir), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=2):  # re-raises a rank's exception with its traceback
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    proc.kill()
                raise TimeoutError(f"{target} on {world} ranks did not finish within {timeout:.0f} s")
        results = []
        for rank in range(world):
            with open(os.path.join(out_dir, f"rank{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results


def launches(target: str, timeout: int = 120):
    """world -> every rank's results of `target` (no payload), launching each world once."""
    runs: dict[int, list] = {}

    def get(world: int) -> list:
        if world not in runs:
            runs[world] = run_ranks(world, target, timeout=timeout)
        return runs[world]
    return get


def error_messages(calls) -> dict[str, str]:
    """calls: (name, fn) pairs -> name: the ValueError message of fn() ("no error" without one)."""
    out = {}
    for name, fn in calls:
        try:
            fn()
            out[name] = "no error"
        except ValueError as e:
            out[name] = str(e)
    return out
