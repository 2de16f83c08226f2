"""Pretraining entry point.

    python launch/pretrain.py +model=sb7b-tiny [train.max_steps=100 data.seq_len=256 ...]
    torchrun --nproc-per-node 8 launch/pretrain.py +model=sb7b train.global_batch=512

Composes conf/ with Hydra's compose API (no per-rank Hydra output folders, no working-directory
change), converts it to typed dataclasses and hands it to `train.run`.
"""
from __future__ import annotations

import logging
import os
import sys

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "conf")


def available_models() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(os.path.join(CONF_DIR, "model")) if f.endswith(".yaml"))


def load_config(overrides: list[str]):
    """Hydra overrides -> RunConfig. Raises SystemExit with a readable message on bad input."""
    from train.config import RunConfig, from_dict

    try:
        with initialize_config_dir(config_dir=os.path.abspath(CONF_DIR), version_base=None):
            cfg = compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise SystemExit(f"error: bad override: {e}") from None
    if "model" not in cfg:
        raise SystemExit("error: no model chosen. Pick one with +model=NAME; available models: "
                         + ", ".join(available_models()))
    try:
        return from_dict(RunConfig, OmegaConf.to_container(cfg, resolve=True))
    except (ValueError, OmegaConfBaseException) as e:
        raise SystemExit(f"error: {e}") from None


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip() + "\n\nmodels: " + ", ".join(available_models()))
        return 0
    cfg = load_config(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    from train import run
    from train.trainer import TrainingError

    try:
        run(cfg)  # SIGTERM/SIGUSR1: saves a checkpoint, returns normally, exit code 0
    except (ValueError, TrainingError) as e:  # bad settings or checkpoints, a diverged run
        raise SystemExit(f"error: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
