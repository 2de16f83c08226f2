import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from data import DataConfig, Loader, SourceSpec, resolve_cache_dir
from tests.helpers import ROOT
from train.config import RunConfig, from_dict


def test_defaults():
    cfg = DataConfig()
    assert (cfg.name, cfg.seq_len, cfg.demo_chars, cfg.vocab_size) == ("demo", 256, 2_000_000, 2048)
    assert (cfg.path, cfg.sources, cfg.packing, cfg.prefetch, cfg.tokenizer) == ("", [], "mixed", 0, "")


@pytest.mark.parametrize(
    "field, value",
    [
        ("name", "c4"),
        ("name", "files"),
        ("seq_len", 0),
        ("seq_len", 7),
        ("seq_len", 8.0),
        ("demo_chars", 100),
        ("vocab_size", 64),
        ("vocab_size", True),
        ("prefetch", -1),
        ("prefetch", 1.5),
        ("prefetch", True),
        ("packing", "per-doc"),
        ("cache_dir", 3),
        ("tokenizer", 3),
        ("sources", "a,b"),
    ],
)
def test_bad_values_name_the_setting(field, value):
    with pytest.raises(ValueError, match=rf"data\.{field}\b"):
        DataConfig(**{field: value})


def test_seq_len_message():
    with pytest.raises(ValueError, match=r"data\.seq_len must be an integer >= 8, got 0"):
        DataConfig(seq_len=0)


def test_sources_become_specs():
    cfg = DataConfig(name="shards", sources=[{"path": "/d/web", "weight": 3, "name": "web"},
                                              SourceSpec(path="/d/code")])
    assert cfg.sources == [SourceSpec("/d/web", 3.0, "web"), SourceSpec("/d/code", 1.0, "")]
    assert cfg.source_specs() == cfg.sources
    assert DataConfig(name="shards", path="/d/web").source_specs() == [SourceSpec("/d/web")]


@pytest.mark.parametrize(
    "sources, message",
    [
        ([{"path": "/a"}, {"path": "/b", "weight": 0}], r"data\.sources\[1\]\.weight must be > 0, got 0"),
        ([{"path": "/a", "weight": -1.5}], r"data\.sources\[0\]\.weight must be > 0"),
        ([{"path": "/a", "weight": float("nan")}], r"data\.sources\[0\]\.weight must be > 0"),
        ([{"path": "/a", "weight": True}], r"data\.sources\[0\]\.weight must be > 0"),
        ([{"path": "/a", "weight": "1"}], r"data\.sources\[0\]\.weight must be > 0"),
        ([{"weight": 1}], r"data\.sources\[0\]\.path must be a shard directory"),
        ([{"path": ""}], r"data\.sources\[0\]\.path"),
        ([{"path": "/a", "name": 3}], r"data\.sources\[0\]\.name must be a string"),
        ([{"path": "/a", "wieght": 2}], r"unknown setting\(s\) data\.sources\[0\]\.wieght"),
        (["/a"], r"data\.sources\[0\] must be a mapping"),
        ([{"path": "/a", "name": "x"}, {"path": "/b", "name": "x"}], r"data\.sources\[0\]\.name 'x' is used"),
    ],
)
def test_bad_sources_name_the_setting(sources, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(name="shards", sources=sources)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="shards"), "exactly one of data.path"),
        (dict(name="shards", path="/a", sources=[{"path": "/b"}]), "exactly one of data.path"),
        (dict(path="/a"), "data.name=shards"),
        (dict(sources=[{"path": "/a"}]), "data.name=shards"),
    ],
)
def test_paths_need_shards(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**kwargs)


def test_missing_shard_directory_is_named(tmp_path):
    cfg = DataConfig(name="shards", sources=[{"path": str(tmp_path)}, {"path": str(tmp_path / "nope")}])
    with pytest.raises(ValueError, match=r"data\.sources\[0\]: .*manifest"):
        Loader(cfg, seed=0, global_batch=1)
    with pytest.raises(ValueError, match=r"data\.path: no shard directory"):
        Loader(DataConfig(name="shards", path=str(tmp_path / "nope")), seed=0, global_batch=1)


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


def compose_data(*overrides):
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base=None):
        # sb7b: the presets' data.seq_len 8192 is beyond the tiny models' positions (4096)
        cfg = compose(config_name="config", overrides=["+model=sb7b", *overrides])
    return from_dict(RunConfig, OmegaConf.to_container(cfg, resolve=True)).data


def test_presets():
    assert compose_data() == DataConfig(val_docs=64)  # the demo preset holds out a validation split
    shards = compose_data("data=shards", "data.path=/d/web", "data.tokenizer=/t/tokenizer.json")
    assert (shards.name, shards.source_specs(), shards.tokenizer) == (
        "shards", [SourceSpec("/d/web")], "/t/tokenizer.json")
    files = compose_data("data=files", "data.path=/d/mine")
    assert files.name == "shards" and files.source_specs() == [SourceSpec("/d/mine")]
    mixture = compose_data("data=mixture", "data.sources=[{path:/d/web,weight:0.7},"
                           "{path:/d/code,weight:0.3,name:code}]", "data.packing=domain")
    assert mixture.sources == [SourceSpec("/d/web", 0.7), SourceSpec("/d/code", 0.3, "code")]
    assert mixture.packing == "domain"
    with pytest.raises(ValueError, match=r"data\.sources\[1\]\.weight must be > 0"):
        compose_data("data=mixture", "data.sources=[{path:/a},{path:/b,weight:0}]")
