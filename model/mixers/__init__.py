"""Token-mixer registry: the layer plan names a mixer, this maps the name to a constructor.

Every mixer is an nn.Module with forward(x [B, T, hidden], ctx: SequenceContext) -> [B, T, hidden].
"""
from .gla import GatedLinearAttention
from .hybrid import hybrid_full, hybrid_swa
from .softmax import full_attention, sliding_window_attention

MIXERS = {
    "full": full_attention,
    "swa": sliding_window_attention,
    "gla": GatedLinearAttention,
    "gla+swa": hybrid_swa,
    "gla+full": hybrid_full,
}


def build_mixer(name: str, cfg):
    if name not in MIXERS:
        raise ValueError(f"unknown token mixer {name!r}; registered: {sorted(MIXERS)}")
    return MIXERS[name](cfg)
