import pytest


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """DataConfig kwargs for the multi-rank tests: 96-token samples (longer than the tiny models'
    window of 64), one demo corpus cache shared by every test."""
    return dict(seq_len=96, demo_chars=200_000, vocab_size=512,
                cache_dir=str(tmp_path_factory.mktemp("demo-cache")))
