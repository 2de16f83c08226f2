"""One small demo entry (200k chars, vocab 512), prepared once and shared by the data tests."""

import pytest

from data import DataConfig, prepare_demo


@pytest.fixture(scope="session")
def demo_cfg(tmp_path_factory):
    cache = tmp_path_factory.mktemp("spikingbrain-cache")
    return DataConfig(cache_dir=str(cache), demo_chars=200_000, vocab_size=512, seq_len=64)


@pytest.fixture(scope="session")
def demo_data(demo_cfg):
    return prepare_demo(demo_cfg)
