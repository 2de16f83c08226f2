from pathlib import Path

import pytest

from data import DataConfig, resolve_cache_dir


def test_defaults():
    cfg = DataConfig()
    assert (cfg.name, cfg.seq_len, cfg.demo_chars, cfg.vocab_size) == ("demo", 256, 2_000_000, 2048)


@pytest.mark.parametrize(
    "field, value",
    [
        ("name", "c4"),
        ("seq_len", 0),
        ("seq_len", 7),
        ("seq_len", 8.0),
        ("demo_chars", 100),
        ("vocab_size", 64),
        ("vocab_size", True),
    ],
)
def test_bad_values_name_the_setting(field, value):
    with pytest.raises(ValueError, match=rf"data\.{field}\b"):
        DataConfig(**{field: value})


def test_seq_len_message():
    with pytest.raises(ValueError, match=r"data\.seq_len must be an integer >= 8, got 0"):
        DataConfig(seq_len=0)


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("SPIKINGBRAIN_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_cache_dir("") == tmp_path / "home" / ".cache" / "spikingbrain"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_dir("") == tmp_path / "xdg" / "spikingbrain"
    monkeypatch.setenv("SPIKINGBRAIN_CACHE", str(tmp_path / "sb"))
    assert DataConfig().resolved_cache_dir() == tmp_path / "sb"
    assert DataConfig(cache_dir=str(tmp_path / "mine")).resolved_cache_dir() == tmp_path / "mine"
    assert resolve_cache_dir("~/x") == Path(tmp_path / "home" / "x")
