"""State-dict and config adapters between this project's models and Hugging Face layouts."""
from .checkpoint import CheckpointError, HFCheckpoint
from .qwen2 import qwen2_config, qwen2_from_hf, qwen2_to_hf
from .spikingbrain import HFStateReader, hf_config, load_hf_checkpoint, load_into, model_config_from_hf

__all__ = ["CheckpointError", "HFCheckpoint", "HFStateReader", "hf_config", "load_hf_checkpoint", "load_into",
           "model_config_from_hf", "qwen2_config", "qwen2_from_hf", "qwen2_to_hf"]
