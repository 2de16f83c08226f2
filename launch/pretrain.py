"""Pretraining entry point.

    python launch/pretrain.py +model=sb7b-tiny [train.max_steps=100 data.seq_len=256 ...]
    python launch/pretrain.py +model=sb7b-tiny recipe=cpt-tiny      # the stages of a recipe in order
    torchrun --nproc-per-node 8 launch/pretrain.py +model=sb7b train.global_batch=512

Composes conf/ with Hydra's compose API (no per-rank Hydra output folders, no working-directory
change), converts it to typed dataclasses and hands it to `train.run`.
"""
from __future__ import annotations

import difflib
import logging
import os
import re
import sys

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "conf")


def available_models() -> list[str]:
    return options("model")


def options(group: str) -> list[str]:
    """The configs of a group of conf/ (`model`, `data`, ...)."""
    return sorted(f[:-5] for f in os.listdir(os.path.join(CONF_DIR, group)) if f.endswith(".yaml"))


def load_config(overrides: list[str]):
    """Hydra overrides -> RunConfig. Raises SystemExit with a readable message on bad input."""
    return load_run(overrides)[0]


def load_run(overrides: list[str]):
    """Hydra overrides -> (RunConfig, RecipeConfig or None: the `recipe:` section of a multi-stage
    recipe). Raises SystemExit with a readable message on bad input."""
    from train.config import RunConfig, from_dict
    from train.recipe import recipe_config

    check_choices(overrides)
    try:
        cfg = compose_config(overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise SystemExit(f"error: {explain(e, overrides)}") from None
    if "model" not in cfg:
        raise SystemExit("error: no model chosen. Pick one with +model=NAME; available models: "
                         + ", ".join(available_models()))
    try:
        tree = OmegaConf.to_container(cfg, resolve=True)
        recipe = recipe_config(tree)
        tree.pop("recipe", None)
        return from_dict(RunConfig, tree), recipe
    except (ValueError, OmegaConfBaseException) as e:
        raise SystemExit(f"error: {e}") from None


def compose_stage(overrides: list[str]):
    """A recipe stage's overrides -> RunConfig; ValueError (not SystemExit) on bad input, so the
    recipe runner can name the stage."""
    try:
        return load_run(overrides)[0]
    except SystemExit as e:
        raise ValueError(str(e).removeprefix("error: ")) from None


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=os.path.abspath(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=overrides)


def check_choices(overrides: list[str]) -> None:
    """Refuse a config group choice (`+model=NAME`, `data=NAME`, ...) that conf/ does not hold,
    naming the closest one and the list (Hydra's own message ends in its search path)."""
    groups = [g for g in os.listdir(CONF_DIR) if os.path.isdir(os.path.join(CONF_DIR, g))]
    for override in overrides:
        bare = override.lstrip("+~")
        group, sep, name = bare.partition("=")
        if not sep or group not in groups:
            continue
        if group == "model" and not override.startswith("+"):
            raise SystemExit(f"error: choose the model with +model={name} (it is not in the "
                             f"defaults list)")
        known = options(group)
        if name not in known and name != "null":
            close = difflib.get_close_matches(name, known, n=1)
            plus = override[:len(override) - len(bare)]
            hint = f"; did you mean {plus}{group}={close[0]}?" if close else ""
            raise SystemExit(f"error: no {group} config {name!r} ({override}){hint}\n"
                             f"available {group} configs: {', '.join(known)}")


UNKNOWN_KEY = re.compile(r"Could not override '([^']+)'")


def explain(error: Exception, overrides: list[str]) -> str:
    """Hydra's message, except for an unknown key: there Hydra suggests adding it with `+`, when
    it is almost always a misspelling, so name the closest setting of the composed config."""
    match = UNKNOWN_KEY.search(str(error))
    if match is None:
        return f"bad override: {error}"
    key = match.group(1)
    others = [o for o in overrides if o.lstrip("+~").partition("=")[0] != key]
    try:
        known = dotted_keys(OmegaConf.to_container(compose_config(others), resolve=False))
    except (HydraException, OmegaConfBaseException):  # another bad override: named once this is fixed
        known = []
    close = difflib.get_close_matches(key, known, n=1)
    return f"unknown setting {key}" + (f"; did you mean {close[0]}?" if close else "")


def dotted_keys(tree: dict, prefix: str = "") -> list[str]:
    """Every key of a nested mapping as a dotted path (`train`, `train.max_steps`, ...)."""
    keys = []
    for key, value in tree.items():
        keys.append(f"{prefix}{key}")
        if isinstance(value, dict):
            keys += dotted_keys(value, f"{prefix}{key}.")
    return keys


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip() + "\n\nmodels: " + ", ".join(available_models()))
        return 0
    cfg, recipe = load_run(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    from train import run
    from train.recipe import RecipeRunner
    from train.trainer import TrainingError

    try:
        if recipe is not None:  # the stages in order, each from the previous one's final weights
            RecipeRunner(recipe, argv, compose_stage).run()
        else:
            run(cfg)  # SIGTERM/SIGUSR1: saves a checkpoint, returns normally, exit code 0
    except (ValueError, TrainingError) as e:  # bad settings or checkpoints, a diverged run
        raise SystemExit(f"error: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
