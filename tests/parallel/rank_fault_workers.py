"""Rank workers of tests/parallel/test_rank_faults.py (run by tests.parallel.ranks.run_ranks)."""
import os
import shutil

from data.config import DataConfig
from parallel import Mesh, ParallelConfig
from tests.helpers import model_config
from train import RunConfig, TrainConfig, build


def _cfg(p):
    data = DataConfig(seq_len=32, demo_chars=100_000, vocab_size=512, cache_dir=p["cache"])
    train = TrainConfig(max_steps=4, global_batch=4, lr=3e-3, warmup_steps=1, log_every=1, save_every=2,
                        run_dir=p["run_dir"], seed=7)
    return RunConfig(model=model_config("sb7b-tiny"), data=data, train=train)


def full_disk_first_save(p):
    """Every rank sees a disk with 1000 bytes free: the first save (no earlier checkpoint to size
    it by) must be refused on every rank before anything is written."""
    usage = shutil.disk_usage(p["run_dir"])
    shutil.disk_usage = lambda path: usage._replace(free=1000)
    mesh = Mesh(ParallelConfig(), "cpu")
    trainer = build(_cfg(p), mesh)
    try:
        trainer.fit()
    except Exception as e:  # TrainingError
        folder = os.path.join(p["run_dir"], "checkpoints")
        return type(e).__name__, str(e), sorted(os.listdir(folder)) if os.path.isdir(folder) else [], trainer.step
    finally:
        trainer.loader.close()
    return None, "", [], trainer.step


def rank0_cannot_write(p):
    """Rank 0 cannot write config.yaml (a directory stands in its place): every rank stops with a
    ValueError at once instead of waiting for rank 0 in the first collective."""
    mesh = Mesh(ParallelConfig(), "cpu")
    try:
        build(_cfg(p), mesh)
    except ValueError as e:
        return str(e)
    return None


def saves_every_two_steps(p):
    """A plain run saving at steps 2 and 4 (the space check's collective runs on every save)."""
    mesh = Mesh(ParallelConfig(), "cpu")
    trainer = build(_cfg(p), mesh)
    try:
        trainer.fit()
    finally:
        trainer.loader.close()
    # rank 0 commits each checkpoint after every rank's files are written: it lists them
    return sorted(os.listdir(os.path.join(p["run_dir"], "checkpoints"))) if mesh.is_main else trainer.step
