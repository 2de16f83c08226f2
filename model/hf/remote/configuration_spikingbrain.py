"""Configurations of SpikingBrain exports, for `AutoConfig.from_pretrained(DST, trust_remote_code=True)`.

Copied into every export folder next to `modeling_spikingbrain.py`; imports only transformers and
the standard library. Two layouts (the project's model/hf/spikingbrain.py writes both):
- `gla_swa` (`GLAswaConfig`, the official SpikingBrain-7B fields): GLA layers except the SWA
  layers in `attn_layers`; dense FFNs; ReLU features and a low-rank gate.
- `spikingbrain_moe` (`SpikingBrainMoEConfig`): the usual top-level fields plus a `spikingbrain`
  entry holding the whole model config (per-layer `mixers` and `ffns`, `gla`, `moe`, `hybrid`,
  `spike`, `qkv_bias`, `head_dim`, `init_std`).
Both give the model the same resolved settings as properties (`mixers`, `ffns`, `gla`, `spike`,
`qkv_bias`, `init_std`; `moe` and `hybrid` where the plan has them), so saving a config writes
back exactly the fields it was read from.
"""
from transformers import PretrainedConfig

BOS_EOS = 151643  # Qwen2.5 / SpikingBrain-7B <|endoftext|>


class SpikingBrainConfig(PretrainedConfig):
    """The fields both layouts carry (names as in Qwen2 / the official SpikingBrain-7B config)."""

    def __init__(self, vocab_size=152064, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, head_dim=None, intermediate_size=18944, hidden_act="swish",
                 max_position_embeddings=131072, sliding_window=4096, norm_eps=1e-6, rope_theta=1e6,
                 tie_word_embeddings=False, bos_token_id=BOS_EOS, eos_token_id=BOS_EOS, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.intermediate_size, self.hidden_act = intermediate_size, hidden_act
        self.max_position_embeddings, self.sliding_window = max_position_embeddings, sliding_window
        self.norm_eps, self.rope_theta = norm_eps, rope_theta
        super().__init__(tie_word_embeddings=tie_word_embeddings, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, **kwargs)


class GLAswaConfig(SpikingBrainConfig):
    """SpikingBrain-7B (`gla_swa`): GLA layers, SWA at `attn_layers`, dense FFNs."""

    model_type = "gla_swa"

    def __init__(self, attn_layers=(), attn_mode="chunk", use_short_conv=False, conv_size=4,
                 gate_low_rank_dim=16, gate_logit_normalizer=16, **kwargs):
        self.attn_layers = list(attn_layers)
        self.attn_mode, self.use_short_conv, self.conv_size = attn_mode, use_short_conv, conv_size
        self.gate_low_rank_dim, self.gate_logit_normalizer = gate_low_rank_dim, gate_logit_normalizer
        super().__init__(**kwargs)

    @property
    def mixers(self):
        swa = {int(i) for i in self.attn_layers}
        return ["swa" if i in swa else "gla" for i in range(self.num_hidden_layers)]

    @property
    def ffns(self):
        return ["dense"] * self.num_hidden_layers

    @property
    def gla(self):
        return {"feature_map": "relu", "gate": "lowrank", "gate_rank": self.gate_low_rank_dim,
                "gate_logit_normalizer": float(self.gate_logit_normalizer)}

    spike = {"enabled": False}
    qkv_bias = True
    init_std = 0.02


class SpikingBrainMoEConfig(SpikingBrainConfig):
    """SpikingBrain-76B and any other plan (`spikingbrain_moe`): settings from `spikingbrain`."""

    model_type = "spikingbrain_moe"

    def __init__(self, spikingbrain=None, **kwargs):
        self.spikingbrain = dict(spikingbrain or {})
        super().__init__(**kwargs)

    def _entry(self, key):
        if key not in self.spikingbrain:
            raise ValueError(f"config.json: the spikingbrain entry has no {key!r}; export the model "
                             f"again with the SpikingBrain framework (launch/convert.py)")
        return self.spikingbrain[key]

    mixers = property(lambda self: list(self._entry("mixers")))
    ffns = property(lambda self: list(self._entry("ffns")))
    gla = property(lambda self: self._entry("gla"))
    moe = property(lambda self: self._entry("moe"))
    hybrid = property(lambda self: self._entry("hybrid"))
    spike = property(lambda self: self.spikingbrain.get("spike", {"enabled": False}))
    qkv_bias = property(lambda self: self._entry("qkv_bias"))
    init_std = property(lambda self: self.spikingbrain.get("init_std", 0.02))
