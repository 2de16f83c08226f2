"""The project's own Hugging Face modeling code, shipped inside every export.

`configuration_spikingbrain.py` and `modeling_spikingbrain.py` import only torch, transformers and
the standard library: `write_remote_code` copies them into an export folder and points its
config.json's `auto_map` at them, so that
`AutoModelForCausalLM.from_pretrained(DST, trust_remote_code=True)` loads and generates without this
project installed. Nothing here imports transformers (it is not a dependency of the framework).
"""
from __future__ import annotations

import json
import os
import shutil

from ..checkpoint import write_json

FILES = ("configuration_spikingbrain.py", "modeling_spikingbrain.py")
# config.json model_type (the layouts of model/hf/spikingbrain.py) -> (config class, model class)
CLASSES = {"gla_swa": ("GLAswaConfig", "GLAswaForCausalLM"),
           "spikingbrain_moe": ("SpikingBrainMoEConfig", "SpikingBrainMoEForCausalLM")}


def write_remote_code(dst: str) -> list[str]:
    """Copies FILES into DST and adds `auto_map` (AutoConfig, AutoModelForCausalLM) and the
    matching `architectures` to DST/config.json, keeping every other field. Returns the files
    copied. ValueError for a config.json whose model_type has no remote code (e.g. qwen2)."""
    path = os.path.join(dst, "config.json")
    with open(path) as f:
        config = json.load(f)
    layout = config.get("model_type")
    if layout not in CLASSES:
        raise ValueError(f"{path}: model_type {layout!r} has no SpikingBrain modeling code; "
                         f"expected one of {sorted(CLASSES)}")
    config_class, model_class = CLASSES[layout]
    here = os.path.dirname(os.path.abspath(__file__))
    for name in FILES:
        shutil.copyfile(os.path.join(here, name), os.path.join(dst, name))
    config["architectures"] = [model_class]
    config["auto_map"] = {"AutoConfig": f"configuration_spikingbrain.{config_class}",
                          "AutoModelForCausalLM": f"modeling_spikingbrain.{model_class}"}
    write_json(path, config)
    return list(FILES)
