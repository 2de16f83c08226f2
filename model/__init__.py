"""Single-device SpikingBrain / Qwen2 model: configs, layer plan, mixers, FFN/MoE, HF adapters."""
from .config import GLAConfig, HybridConfig, LayerPlan, ModelConfig, MoEConfig
from .context import SequenceContext
from .decoder import IGNORE_INDEX, Decoder, DecoderOutput, build_model

__all__ = ["GLAConfig", "HybridConfig", "LayerPlan", "ModelConfig", "MoEConfig", "SequenceContext",
           "IGNORE_INDEX", "Decoder", "DecoderOutput", "build_model"]
