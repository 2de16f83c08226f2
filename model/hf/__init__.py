"""State-dict and config adapters between this project's models and Hugging Face layouts."""
from .qwen2 import qwen2_config, qwen2_from_hf, qwen2_to_hf

__all__ = ["qwen2_config", "qwen2_from_hf", "qwen2_to_hf"]
