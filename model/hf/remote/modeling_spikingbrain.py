"""SpikingBrain models for Hugging Face transformers:
`AutoModelForCausalLM.from_pretrained(DST, trust_remote_code=True)` on an export of the SpikingBrain
framework (layouts `gla_swa` and `spikingbrain_moe`, see configuration_spikingbrain.py).

Copied into every export folder; imports only torch, transformers and the standard library. It
computes what the framework's model computes (model/decoder.py, model/mixers/, model/moe.py,
model/spiking.py), in plain PyTorch:
- block: x + attn(attn_norm(x)), then + mlp(mlp_norm(.)); final RMSNorm; LM head (or tied);
- GLA: feature map on q and k, per-channel log-decay (7B: logsigmoid(gk_proj(x)) / normalizer;
  76B: log(1 - sigmoid(k)), the decay tied to the key), state per KV head shared by its query
  heads, scale head_dim^-0.5, per-head RMSNorm `g_norm`; no RoPE;
- softmax attention: RoPE (rotate-half), GQA; a window w lets query i see keys i-w ... i;
- hybrid (76B): GLA and softmax branch on the same q/k/v, softmax output through `s_norm`, sink
  tokens (`sinks`, projected by k_proj/v_proj, no RoPE) visible to every query; summed, o_proj;
- MoE: softmax router, top-k experts weighted by their probability (not renormalised), plus the
  always-on shared expert; spiking (`spike.enabled`) on the inputs of the selected projections.

Decoding keeps a `SpikingBrainCache`: per GLA layer one state [B, Hkv, K, V] (constant memory per
token), per SWA layer the last `sliding_window` keys/values, per full-attention layer all of them;
`generate()` feeds each step only the new token. Rotary tables are computed from the positions in
every forward, never stored in a buffer, so from_pretrained's meta-device initialisation
(transformers 5) cannot leave them unset. Padding must be on the left (as generate pads).
"""
import torch
from torch import nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_spikingbrain import GLAswaConfig, SpikingBrainMoEConfig

# transformers 5.x renamed the cache argument and output field from `past_key_values` to `cache`
CACHE_KEY = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
GLA_CHUNK = 16      # tokens per step of the chunked GLA form (prefill; a decoding step is one token)
QUERY_BLOCK = 1024  # queries per softmax-attention block: prefill memory grows with it, not with T^2
FEATURE_MAPS = {"relu": F.relu, "sigmoid": torch.sigmoid, "identity": lambda t: t}


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, normalised in float32."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotary(positions, dim, theta):
    """positions [B, T] -> cos, sin [B, T, 1, dim] in float32 (rotate-half layout of Qwen2)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.int64).float() / dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None]
    return emb.cos(), emb.sin()


def apply_rotary(x, cos, sin):
    """x [B, T, H, D] -> rotated, in x's dtype."""
    half = x.shape[-1] // 2
    return x * cos.to(x.dtype) + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin.to(x.dtype)


def spike_quantize(x, k):
    """round(x / V_th) * V_th with V_th = clamp(mean(|x|) / k, 1e-5, 1e4) per token (float32),
    straight-through gradient."""
    xf = x.float()
    total = xf.abs().sum(-1, keepdim=True)
    v_th = (total / torch.full_like(total, x.shape[-1] * k)).clamp(1e-5, 1e4)
    out = (torch.round(xf / v_th) * v_th).to(x.dtype)
    return out.detach() + (x - x.detach())


def gated_linear_attention(q, k, v, g, state, scale):
    """q [B, T, Hkv, G, K], k/g [B, T, Hkv, K] (g <= 0, log-decay), v [B, T, Hkv, V], state
    [B, Hkv, K, V] float32 -> o [B, T, Hkv, G, V] float32, final state. Per KV head
    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t and o_t = scale * q_t S_t, chunk by chunk (a chunk
    of one token is the recurrent step)."""
    q, k, v, g = q.float() * scale, k.float(), v.float(), g.float()
    outs = []
    for s in range(0, q.shape[1], GLA_CHUNK):
        qc, kc, vc, gc = (t[:, s:s + GLA_CHUNK] for t in (q, k, v, g))
        b = gc.cumsum(1)  # [B, C, H, K]: log-decay from the chunk start through t
        c = b.shape[1]
        later = ~torch.ones(c, c, dtype=torch.bool, device=b.device).tril()[None, :, :, None, None]
        decay = (b[:, :, None] - b[:, None]).masked_fill(later, float("-inf")).exp()  # [B, t, s, H, K]
        scores = torch.einsum("bthgk,btshk,bshk->bthgs", qc, decay, kc)
        o = torch.einsum("bthgs,bshv->bthgv", scores, vc)
        outs.append(o + torch.einsum("bthgk,bhkv->bthgv", qc * b.exp()[:, :, :, None], state))
        last = b[:, -1]
        state = last.exp()[..., None] * state + torch.einsum("bshk,bshv->bhkv", kc * (last[:, None] - b).exp(), vc)
    return torch.cat(outs, dim=1), state


def softmax_attention(q, k, v, valid, window, sink_k=None, sink_v=None):
    """q [B, T, Hq, D] (the last T of the L keys), k/v [B, L, Hkv, D], valid [B, L] (False: a
    padding key, visible to nobody but itself), sinks [S, Hkv, D] -> [B, T, Hq, D] in q's dtype.
    Query i sees keys i - window ... i (all earlier ones when window is None) and every sink."""
    B, T, Hq, D = q.shape
    L, Hkv = k.shape[1], k.shape[2]
    outs = []
    for lo in range(0, T, QUERY_BLOCK):
        hi = min(lo + QUERY_BLOCK, T)
        end = L - T + hi  # keys past the block's last query are never visible
        first = 0 if window is None else max(0, L - T + lo - window)
        dist = (torch.arange(L - T + lo, end, device=q.device)[:, None]
                - torch.arange(first, end, device=q.device)[None])
        mask = (dist >= 0) & ((dist == 0) | valid[:, None, first:end])  # [B, t, s]
        if window is not None:
            mask = mask & (dist <= window)
        ks, vs = k[:, first:end], v[:, first:end]
        if sink_k is not None:
            ks = torch.cat([sink_k[None].expand(B, -1, -1, -1), ks], dim=1)
            vs = torch.cat([sink_v[None].expand(B, -1, -1, -1), vs], dim=1)
            mask = torch.cat([mask.new_ones(B, hi - lo, sink_k.shape[0]), mask], dim=-1)
        qg = q[:, lo:hi].float().reshape(B, hi - lo, Hkv, Hq // Hkv, D)
        scores = torch.einsum("bthgd,bshd->bhgts", qg, ks.float()) * D ** -0.5
        scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
        outs.append(torch.einsum("bhgts,bshd->bthgd", scores.softmax(-1), vs.float()))
    return torch.cat(outs, dim=1).reshape(B, T, Hq, D).to(q.dtype)


class SpikingBrainCache:
    """Decoding state, one dict per layer: `state` [B, Hkv, K, V] float32 for GLA; rotated keys
    `k`, values `v` [B, L, Hkv, D] and `valid` [B, L] for softmax attention (L <= sliding_window
    in SWA layers). `get_seq_length()` counts the tokens seen; `next_position` [B] is each row's
    next RoPE position."""

    def __init__(self, num_layers):
        self.layers = [{} for _ in range(num_layers)]
        self.seen, self.next_position = 0, None

    def get_seq_length(self, layer_idx=0):
        return self.seen

    def reorder_cache(self, beam_idx):
        """Keeps the rows `beam_idx` (beam search), in place."""
        for layer in self.layers:
            for key, t in layer.items():
                layer[key] = t.index_select(0, beam_idx.to(t.device))
        self.next_position = self.next_position.index_select(0, beam_idx.to(self.next_position.device))


class SwiGLU(nn.Module):
    def __init__(self, hidden, intermediate):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """E SwiGLU experts stacked as nn.Linear weights: gate/up [E, F, D], down [E, D, F]."""

    def __init__(self, num_experts, hidden, size):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, size, hidden))
        self.up_proj = nn.Parameter(torch.empty(num_experts, size, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, size))
        self.hidden_fn = None  # applied before down_proj (spiking sets it)

    def forward(self, x, idx, weight):
        """x [N, D], idx/weight [N, k] -> [N, D]: sum over j of weight[n, j] * expert idx[n, j] of x[n]."""
        out = torch.zeros_like(x)
        for e in range(self.gate_proj.shape[0]):
            rows, slots = (idx == e).nonzero(as_tuple=True)
            if rows.numel():
                h = F.silu(F.linear(x[rows], self.gate_proj[e])) * F.linear(x[rows], self.up_proj[e])
                h = h if self.hidden_fn is None else self.hidden_fn(h)
                out.index_add_(0, rows, F.linear(h, self.down_proj[e]) * weight[rows, slots, None])
        return out


class MoE(nn.Module):
    """Softmax router, top-k routed experts, shared experts (side by side as one wide SwiGLU)."""

    def __init__(self, config):
        super().__init__()
        m = config.moe
        size = m.get("expert_size") or config.intermediate_size
        self.top_k = m["top_k"]
        self.router = nn.Linear(config.hidden_size, m["num_experts"], bias=False)
        self.experts = Experts(m["num_experts"], config.hidden_size, size)
        self.shared = SwiGLU(config.hidden_size, size * m["num_shared"]) if m["num_shared"] else None

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weight, idx = F.softmax(self.router(x).float(), dim=-1).topk(self.top_k, dim=-1)
        y = self.experts(x, idx, weight.to(x.dtype))
        if self.shared is not None:
            y = y + self.shared(x)
        return y.reshape(shape)


class Attention(nn.Module):
    """The token mixer the plan names: "gla", "swa", "full", "gla+swa" or "gla+full"."""

    def __init__(self, config, mixer):
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.use_gla, self.use_softmax, self.hybrid = mixer.startswith("gla"), mixer != "gla", "+" in mixer
        self.window = c.sliding_window if mixer.endswith("swa") else None
        self.shared = not self.hybrid or c.hybrid["shared_qkvo"]
        for prefix in ("",) if self.shared else ("", "gla_"):
            for name, (n_in, n_out) in {"q": (c.hidden_size, c.num_attention_heads * c.head_dim),
                                        "k": (c.hidden_size, c.num_key_value_heads * c.head_dim),
                                        "v": (c.hidden_size, c.num_key_value_heads * c.head_dim),
                                        "o": (c.num_attention_heads * c.head_dim, c.hidden_size)}.items():
                setattr(self, f"{prefix}{name}_proj", nn.Linear(n_in, n_out, bias=c.qkv_bias and name != "o"))
        if self.use_gla:
            gla = c.gla
            self.feature_map, self.key_gate = FEATURE_MAPS[gla["feature_map"]], gla["gate"] == "key"
            if not self.key_gate:
                self.gate_logit_normalizer = gla["gate_logit_normalizer"]
                self.gk_proj = nn.Sequential(nn.Linear(c.hidden_size, gla["gate_rank"], bias=False),
                                             nn.Linear(gla["gate_rank"], c.num_key_value_heads * c.head_dim))
            self.g_norm = RMSNorm(c.head_dim, c.norm_eps)
        self.sinks = None
        if self.hybrid:
            self.s_norm = RMSNorm(c.head_dim, c.norm_eps)
            if c.hybrid["num_sinks"]:
                self.sinks = nn.Parameter(torch.empty(c.hybrid["num_sinks"], c.hidden_size))

    def _qkv(self, x, prefix):
        b, t, _ = x.shape
        return (getattr(self, f"{prefix}q_proj")(x).view(b, t, self.num_heads, self.head_dim),
                getattr(self, f"{prefix}k_proj")(x).view(b, t, self.num_kv_heads, self.head_dim),
                getattr(self, f"{prefix}v_proj")(x).view(b, t, self.num_kv_heads, self.head_dim))

    def forward(self, x, cos, sin, valid, cache):
        """x [B, T, hidden], cos/sin [B, T, 1, D], valid [B, T] (False at padding), cache: this
        layer's dict, updated in place -> [B, T, hidden]."""
        q, k, v = self._qkv(x, "")
        if self.use_gla:
            o_lin = self.g_norm(self._gla(x, *((q, k, v) if self.shared else self._qkv(x, "gla_")), valid, cache))
            if not self.use_softmax:
                return self.o_proj(o_lin.flatten(-2))
        o_soft = self._softmax(q, k, v, cos, sin, valid, cache)
        if not self.hybrid:
            return self.o_proj(o_soft.flatten(-2))
        o_soft = self.s_norm(o_soft)
        if self.shared:
            return self.o_proj((o_lin + o_soft).flatten(-2))
        return self.o_proj(o_soft.flatten(-2)) + self.gla_o_proj(o_lin.flatten(-2))

    def _gla(self, x, q, k, v, valid, cache):
        b, t, _, d = q.shape
        if self.key_gate:  # log(1 - sigmoid(k)), without cancellation
            g = F.logsigmoid(-k.float())
        else:
            g = F.logsigmoid(self.gk_proj(x).float()).view_as(k) / self.gate_logit_normalizer
        q, k = self.feature_map(q), self.feature_map(k)
        keep = valid[:, :, None, None]  # a (left) padding token adds nothing to the empty state
        k, v = k * keep, v * keep
        state = cache.get("state")
        if state is None:
            state = x.new_zeros(b, self.num_kv_heads, d, d, dtype=torch.float32)
        o, cache["state"] = gated_linear_attention(q.view(b, t, self.num_kv_heads, -1, d), k, v, g, state, d ** -0.5)
        return o.reshape(b, t, self.num_heads, d).to(q.dtype)

    def _softmax(self, q, k, v, cos, sin, valid, cache):
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if "k" in cache:
            k, v, valid = (torch.cat([cache[n], t], dim=1) for n, t in (("k", k), ("v", v), ("valid", valid)))
        sink_k = sink_v = None
        if self.sinks is not None:
            s = self.sinks.to(q.dtype)
            sink_k = self.k_proj(s).view(-1, self.num_kv_heads, self.head_dim)
            sink_v = self.v_proj(s).view(-1, self.num_kv_heads, self.head_dim)
        o = softmax_attention(q, k, v, valid, self.window, sink_k, sink_v)
        if self.window is not None:  # the next query sees only the last `window` of these keys
            k, v, valid = (t[:, -self.window:].clone() for t in (k, v, valid))
        cache["k"], cache["v"], cache["valid"] = k, v, valid
        return o


class SpikingBrainBlock(nn.Module):
    def __init__(self, config, index):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = Attention(config, config.mixers[index])
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = (MoE(config) if config.ffns[index] == "moe"
                    else SwiGLU(config.hidden_size, config.intermediate_size))

    def forward(self, x, cos, sin, valid, cache):
        x = x + self.attn(self.attn_norm(x), cos, sin, valid, cache)
        return x + self.mlp(self.mlp_norm(x))


class SpikingBrainModel(nn.Module):
    """Embeddings, blocks, final norm (the `model.` part of the checkpoint names)."""

    def __init__(self, config):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(SpikingBrainBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)


def spike_group(name):
    """The `spike.targets` group of the projection called `name` (the framework's rule)."""
    if name == "lm_head":
        return "head"
    for part, group in ((".attn.", "attn"), (".mlp.router", "router"), (".mlp.shared.", "experts"),
                        (".mlp.experts", "experts"), (".mlp.", "mlp")):
        if part in name:
            return group
    return None


def attach_spiking(model, spike):
    """Spikes the inputs of the projections in `spike["targets"]` (and the routed experts' hidden
    activations before their down projection)."""
    k = spike["k"]

    def hook(module, args):
        return (spike_quantize(args[0], k),) + tuple(args[1:])

    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Experts)) and spike_group(name) in spike["targets"]:
            module.register_forward_pre_hook(hook)
            if isinstance(module, Experts):
                module.hidden_fn = lambda h: spike_quantize(h, k)


class SpikingBrainForCausalLM(PreTrainedModel, GenerationMixin):
    """Decoder + LM head. forward(input_ids [B, T], attention_mask [B, seen + T] or [B, T],
    past_key_values (transformers 5: cache) = the SpikingBrainCache of the previous call, labels)
    -> CausalLMOutputWithPast (logits [B, T, vocab], loss, the updated cache when use_cache)."""

    base_model_prefix = "model"
    _no_split_modules = ["SpikingBrainBlock"]

    def __init__(self, config):
        super().__init__(config)
        if getattr(config, "use_short_conv", False):
            raise ValueError("config.json: use_short_conv=true is not supported (SpikingBrain-7B has it off)")
        self.model = SpikingBrainModel(config)
        self.lm_head = (None if config.tie_word_embeddings
                        else nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        if config.spike.get("enabled"):
            attach_spiking(self, config.spike)
        self.post_init()

    def _init_weights(self, module):
        """Fresh weights (from_config; from_pretrained loads every tensor of an export)."""
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, Experts):
            for p in (module.gate_proj, module.up_proj, module.down_proj):
                nn.init.normal_(p, std=std)
        elif isinstance(module, Attention) and module.sinks is not None:
            nn.init.normal_(module.sinks, std=std)

    def get_input_embeddings(self):
        return self.model.embeddings

    def set_input_embeddings(self, value):
        self.model.embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, return_dict=None, logits_to_keep=0, **kwargs):
        cache = kwargs.get("cache", past_key_values)
        if cache is not None and not isinstance(cache, SpikingBrainCache):
            raise TypeError(f"the cache must be the SpikingBrainCache a previous call returned, "
                            f"got {type(cache).__name__}")
        use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
        h = self.model.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = h.shape[:2]
        cache = SpikingBrainCache(len(self.model.layers)) if cache is None else cache
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("attention_mask must be [B, L] (1 for tokens, 0 for left padding)")
        valid = (torch.ones(b, t, dtype=torch.bool, device=h.device) if attention_mask is None
                 else attention_mask[:, -t:].bool())
        if position_ids is None:
            start = (torch.zeros(b, dtype=torch.long, device=h.device) if cache.next_position is None
                     else cache.next_position)
            position_ids = (start[:, None] + valid.long().cumsum(1) - 1).clamp(min=0)
        cos, sin = rotary(position_ids, self.config.head_dim, self.config.rope_theta)
        for block, layer_cache in zip(self.model.layers, cache.layers):
            h = block(h, cos, sin, valid, layer_cache)
        cache.seen, cache.next_position = cache.seen + t, position_ids[:, -1] + 1
        h = self.model.norm(h[:, -logits_to_keep:])
        logits = self.lm_head(h) if self.lm_head is not None else F.linear(h, self.model.embeddings.weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_KEY: cache if use_cache else None})
        return out.to_tuple() if return_dict is False else out

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, use_cache=True,
                                      **kwargs):
        """Feeds the tokens the cache has not seen. A cache transformers made itself (an empty
        DynamicCache in 4.5x / 5.x) is dropped: the first forward starts a SpikingBrainCache."""
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("generate() from inputs_embeds is not supported; pass input_ids")
        cache = kwargs.get("cache", past_key_values)
        if isinstance(cache, SpikingBrainCache):
            input_ids = input_ids[:, cache.get_seq_length():]
        else:
            cache = None
        return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache, CACHE_KEY: cache,
                "logits_to_keep": kwargs.get("logits_to_keep", 0)}  # generate asks for 1 (4.50+)


class GLAswaForCausalLM(SpikingBrainForCausalLM):
    """SpikingBrain-7B layout (`gla_swa`)."""

    config_class = GLAswaConfig


class SpikingBrainMoEForCausalLM(SpikingBrainForCausalLM):
    """SpikingBrain-76B and any other plan (`spikingbrain_moe`)."""

    config_class = SpikingBrainMoEConfig
