"""GPU tests (marked `gpu`) skip on machines without CUDA. Weights & Biases is off in every test
and the processes they start (train/wandb_log.py honours WANDB_MODE=disabled): each wandb run
would start a service process, and tests never reach the network. tests/train/test_observe.py
turns it back on where it tests it."""
import os

import pytest
import torch

os.environ["WANDB_MODE"] = "disabled"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run directory holding a checkpoint of sb7b-tiny trained for a few steps (shared)."""
    from tests.helpers import train_tiny

    root = tmp_path_factory.mktemp("tiny_run")
    return train_tiny(str(root / "run"), str(root / "cache"))
