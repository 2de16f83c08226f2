"""Typed configuration: dicts become dataclasses; unknown keys and wrong types name the setting."""
import pytest

from train.config import RunConfig, TrainConfig, from_dict


def test_nested_dict_becomes_dataclasses():
    cfg = from_dict(RunConfig, {"model": {"name": "m", "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2,
                                          "layer_plan": {"mixer": ["gla", "swa"]}},
                                "train": {"lr": 1, "max_steps": 3}})
    assert cfg.model.mixers[:2] == ["gla", "swa"] and cfg.model.head_dim == 16
    assert isinstance(cfg.train.lr, float) and cfg.train.max_steps == 3
    assert cfg.data.name == "demo" and cfg.parallel.dp == 0


@pytest.mark.parametrize("data, message", [
    ({"train": {"max_stepz": 1}}, "train.max_stepz"),
    ({"train": {"max_steps": 2.5}}, "train.max_steps must be an integer"),
    ({"train": {"dry_run": "yes"}}, "train.dry_run must be true or false"),
    ({"train": {"lr": "fast"}}, "train.lr must be a number"),
    ({"train": {"run_dir": 3}}, "train.run_dir must be a string"),
    ({"train": {"precision": "fp8"}}, "train.precision"),
    ({"model": {"layer_plan": {"mixer": "gla"}}}, "model.layer_plan.mixer must be a list"),
    ({"model": {"gla": 3}}, "model.gla must be a mapping"),
])
def test_bad_values_name_the_setting(data, message):
    data = {"model": {"hidden_size": 64, "num_heads": 4, "num_kv_heads": 2, **data.pop("model", {})}, **data}
    with pytest.raises(ValueError, match=message):
        from_dict(RunConfig, data)


def test_model_is_required():
    with pytest.raises(ValueError, match="model"):
        from_dict(RunConfig, {"train": {}})


def test_train_config_validates_ranges():
    with pytest.raises(ValueError, match="train.global_batch"):
        TrainConfig(global_batch=0)
    with pytest.raises(ValueError, match="train.min_lr_ratio"):
        TrainConfig(min_lr_ratio=2.0)
