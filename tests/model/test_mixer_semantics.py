"""Every token mixer against a per-token float64 loop written from SPIKINGBRAIN.md's formulas.

The loops below read only the module's weights: feature maps, decays, scales, RoPE, windows,
sinks and GQA grouping are spelled out here, not imported from ops/ or model/. Each mixer is
compared on whole rows (one document each) and on packed rows (documents via cu_seqlens, where
state and attention restart). The mutation tests then break one rule in the module at a time and
require the same comparison to fail, so the semantic tests cannot pass vacuously.
"""
import types

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import model.context as context_mod
import model.mixers.gla as gla_mod
from model import SequenceContext
from model.mixers import build_mixer
from tests.helpers import model_config

HIDDEN, HQ, HKV, WINDOW, SINKS = 48, 4, 2, 5, 3
D, G = HIDDEN // HQ, HQ // HKV
# RMSNorm is scale-invariant up to eps: with eps 1e-6 g_norm cancels the GLA scale except where a
# head's output is near zero, so eps here is of the order of the pre-norm mean square (about 1).
EPS = 0.5
# At theta 1e6 and 20 positions only the fastest frequency pairs turn noticeably; at 100 every
# pair does, so the frequencies and the rotate-half layout are checked too.
THETA = 100.0
# The module computes rms_norm and the RoPE tables in float32 even for float64 inputs, which caps
# agreement near 1e-7 at outputs of size ~5; every mutation below moves the output by more than 0.1.
TOL = dict(rtol=1e-5, atol=1e-5)
ONE_DOC = [[20], [20]]               # two rows, one document each: the dense path
PACKED = [[7, 1, 12], [13, 7]]       # rows of 20 split into documents: the cu_seqlens path
# name -> (base config, mixer, shared_qkvo)
KINDS = {
    "gla": ("sb7b-tiny", "gla", True),
    "swa": ("sb7b-tiny", "swa", True),
    "full": ("qwen2.5-7b-tiny", "full", True),
    "gla+swa/shared": ("sb76b-tiny", "gla+swa", True),
    "gla+swa/separate": ("sb76b-tiny", "gla+swa", False),
    "gla+full/shared": ("sb76b-tiny", "gla+full", True),
    "gla+full/separate": ("sb76b-tiny", "gla+full", False),
}


def build(kind, seed=0):
    """The mixer of `kind` from its tiny config, float64, with every parameter random (biases,
    norm scales and sinks included, so a tensor the module ignores shows up)."""
    base, mixer, shared = KINDS[kind]
    cfg = model_config(base, hidden_size=HIDDEN, num_heads=HQ, num_kv_heads=HKV, num_layers=1,
                       sliding_window=WINDOW, norm_eps=EPS, rope_theta=THETA,
                       layer_plan={"mixer": [mixer], "ffn": ["dense"]},
                       hybrid={"shared_qkvo": shared, "num_sinks": SINKS})
    module = build_mixer(mixer, cfg).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * noise)
            elif name.endswith(".weight"):
                p.copy_(noise * p.shape[1] ** -0.5)
            elif name == "sinks":
                p.copy_(noise)
            else:
                p.copy_(0.3 * noise)
    return module


def inputs(lengths, seed=1):
    """x [B, T, hidden] and position_ids [B, T] restarting at 0 at every document start."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), sum(lengths[0]), HIDDEN, generator=gen, dtype=torch.float64)
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    return x, pos


def module_output(module, lengths):
    """The module's forward through SequenceContext, as [number of tokens, hidden]."""
    x, pos = inputs(lengths)
    ctx = SequenceContext.from_position_ids(pos)
    if ctx.packed:  # the decoder hands packed activations over flattened to [1, B*T, hidden]
        x = x.reshape(1, -1, HIDDEN)
    with torch.no_grad():
        return module(x, ctx).reshape(-1, HIDDEN)


# ---- the formulas, one token at a time -------------------------------------------------------

def affine(p, name, x):
    y = x @ p[f"{name}.weight"].T
    return y + p[f"{name}.bias"] if f"{name}.bias" in p else y


def rms(x, weight):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + EPS) * weight


def rope(x, pos):
    """x [..., D] at position pos: pair (i, i + D/2) turned by pos * THETA^(-2i/D) (Qwen2 rotate-half)."""
    half = D // 2
    angle = pos * THETA ** (-2 * torch.arange(half, dtype=torch.float64) / D)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], -1)


def gla_doc(p, x, prefix, tied_decay):
    """One document x [L, hidden] -> [L, Hq, D] before g_norm. 7B: ReLU features, decay
    exp(logsigmoid(W2 W1 x + b) / 16); 76B: sigmoid features, alpha = 1 - k. One state per KV
    head, read by query heads h with h // G == that KV head."""
    L = x.shape[0]
    q = affine(p, f"{prefix}q_proj", x).view(L, HQ, D)
    k = affine(p, f"{prefix}k_proj", x).view(L, HKV, D)
    v = affine(p, f"{prefix}v_proj", x).view(L, HKV, D)
    if tied_decay:
        q, k = torch.sigmoid(q), torch.sigmoid(k)
        alpha = 1 - k
    else:
        q, k = q.clamp(min=0), k.clamp(min=0)
        logit = affine(p, "gk_proj.1", affine(p, "gk_proj.0", x)).view(L, HKV, D)
        alpha = torch.exp(torch.log(1 / (1 + torch.exp(-logit))) / 16)
    state = torch.zeros(HKV, D, D, dtype=torch.float64)
    out = torch.zeros(L, HQ, D, dtype=torch.float64)
    for t in range(L):
        for kv in range(HKV):
            state[kv] = alpha[t, kv][:, None] * state[kv] + torch.outer(k[t, kv], v[t, kv])
        for h in range(HQ):
            out[t, h] = (q[t, h] * D ** -0.5) @ state[h // G]
    return out


def softmax_doc(p, x, window, sinks):
    """One document x [L, hidden] -> [L, Hq, D]: query i sees the sinks (projected by k/v_proj,
    no RoPE) and keys j in [i - window, i] (all j <= i when window is None), RoPE at the
    positions within the document, scale D^-0.5, query head h on KV head h // G."""
    L = x.shape[0]
    q = affine(p, "q_proj", x).view(L, HQ, D)
    k = affine(p, "k_proj", x).view(L, HKV, D)
    v = affine(p, "v_proj", x).view(L, HKV, D)
    q = torch.stack([rope(q[i], i) for i in range(L)])
    k = torch.stack([rope(k[i], i) for i in range(L)])
    sink_k = affine(p, "k_proj", p["sinks"]).view(-1, HKV, D) if sinks else torch.zeros(0, HKV, D)
    sink_v = affine(p, "v_proj", p["sinks"]).view(-1, HKV, D) if sinks else torch.zeros(0, HKV, D)
    out = torch.zeros(L, HQ, D, dtype=torch.float64)
    for i in range(L):
        first = 0 if window is None else max(0, i - window)
        for h in range(HQ):
            kv = h // G
            keys = torch.cat([sink_k[:, kv], k[first:i + 1, kv]])
            values = torch.cat([sink_v[:, kv], v[first:i + 1, kv]])
            scores = keys @ q[i, h] * D ** -0.5
            weights = torch.exp(scores - scores.max())
            out[i, h] = (weights / weights.sum()) @ values
    return out


def reference_doc(kind, p, x):
    """One document x [L, hidden] -> [L, hidden]."""
    L = x.shape[0]
    mixer, shared = KINDS[kind][1], KINDS[kind][2]
    if mixer == "gla":
        return affine(p, "o_proj", rms(gla_doc(p, x, "", False), p["g_norm.weight"]).view(L, -1))
    window = None if mixer.endswith("full") else WINDOW
    if "+" not in mixer:
        return affine(p, "o_proj", softmax_doc(p, x, window, sinks=False).view(L, -1))
    o_lin = rms(gla_doc(p, x, "" if shared else "gla_", True), p["g_norm.weight"]).view(L, -1)
    o_soft = rms(softmax_doc(p, x, window, sinks=True), p["s_norm.weight"]).view(L, -1)
    if shared:
        return affine(p, "o_proj", o_lin + o_soft)
    return affine(p, "o_proj", o_soft) + affine(p, "gla_o_proj", o_lin)


def reference_output(kind, module, lengths):
    """Every document of `lengths` on its own, from scratch: [number of tokens, hidden]."""
    p = {name: t.detach() for name, t in module.named_parameters()}
    x, _ = inputs(lengths)
    outs = []
    for row, doc_lengths in zip(x, lengths):
        start = 0
        for n in doc_lengths:
            outs.append(reference_doc(kind, p, row[start:start + n]))
            start += n
    return torch.cat(outs)


def matches(module, lengths, ref):
    return torch.allclose(module_output(module, lengths), ref, **TOL)


@pytest.mark.parametrize("lengths", [ONE_DOC, PACKED], ids=["one_doc", "packed"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_mixer_matches_formulas(kind, lengths):
    module = build(kind)
    ref = reference_output(kind, module, lengths)
    torch.testing.assert_close(module_output(module, lengths), ref, **TOL)


# ---- mutations: each breaks one rule, and the comparison above must then fail ----------------

def change_op(monkeypatch, op_name, change):
    """Routes model.context's `op_name` (chunk_gla or attention) through `change(args, kwargs)`."""
    op = getattr(context_mod, op_name)

    def changed(*args, **kwargs):
        args, kwargs = change(list(args), kwargs)
        return op(*args, **kwargs)
    monkeypatch.setattr(context_mod, op_name, changed)


def scale_one_over_d(args, kwargs):
    return args, {**kwargs, "scale": 1.0 / D}


def kv_head_modulo(args, kwargs):
    """Repeats k/v (and g, sinks) head-wise in tile order, so query head h reads KV head h % Hkv."""
    args = [a if i == 0 else a.repeat(1, 1, G, 1) for i, a in enumerate(args)]
    for key in ("sink_k", "sink_v"):
        if kwargs.get(key) is not None:
            kwargs = {**kwargs, key: kwargs[key].repeat(1, G, 1)}
    return args, kwargs


def no_document_reset(args, kwargs):
    return args, {**kwargs, "cu_seqlens": None}


def sinks_with_rope(args, kwargs):
    """Sink keys turned as if they stood at positions 0 .. S-1."""
    sink_k = kwargs["sink_k"]
    return args, {**kwargs, "sink_k": torch.stack([rope(sink_k[s], s) for s in range(len(sink_k))])}


def gate_sign(monkeypatch, module):
    """logsigmoid(-z) wherever model/mixers/gla.py asks for logsigmoid(z): the 76B decay becomes
    logsigmoid(k) (alpha = k), the 7B gate logsigmoid(-gk) / 16."""
    flipped = dict(vars(F), logsigmoid=lambda z: F.logsigmoid(-z))
    monkeypatch.setattr(gla_mod, "F", types.SimpleNamespace(**flipped))


def module_attr(name, value):
    return lambda mp, module: mp.setattr(module, name, value)


def config_attr(section, name, value):
    """Sets cfg.section.name (cfg.name when section is None) of the module's config."""
    return lambda mp, module: mp.setattr(getattr(module.cfg, section) if section else module.cfg,
                                         name, value)


def op(op_name, change):
    return lambda mp, module: change_op(mp, op_name, change)


MUTATIONS = {
    # 7B GLA
    "gla/identity_features": ("gla", config_attr("gla", "feature_map", "identity")),
    "gla/gate_normaliser_1": ("gla", config_attr("gla", "gate_logit_normalizer", 1.0)),
    "gla/gate_sign": ("gla", gate_sign),
    "gla/scale_1_over_d": ("gla", op("chunk_gla", scale_one_over_d)),
    "gla/no_g_norm": ("gla", module_attr("g_norm", nn.Identity())),
    "gla/kv_head_modulo": ("gla", op("chunk_gla", kv_head_modulo)),
    "gla/no_document_reset": ("gla", op("chunk_gla", no_document_reset)),
    # 7B SWA and full attention
    "swa/window_w_keys": ("swa", module_attr("window", WINDOW - 1)),
    "swa/window_w_plus_2_keys": ("swa", module_attr("window", WINDOW + 1)),
    "swa/scale_1_over_d": ("swa", op("attention", scale_one_over_d)),
    "swa/rope_theta_1e4": ("swa", config_attr(None, "rope_theta", 1e4)),
    "swa/kv_head_modulo": ("swa", op("attention", kv_head_modulo)),
    "swa/no_document_reset": ("swa", op("attention", no_document_reset)),
    "full/windowed": ("full", module_attr("window", WINDOW)),
    "full/scale_1_over_d": ("full", op("attention", scale_one_over_d)),
    # 76B parallel hybrid
    "gla+swa/relu_features": ("gla+swa/shared", config_attr("gla", "feature_map", "relu")),
    "gla+swa/decay_logsigmoid_k": ("gla+swa/shared", gate_sign),
    "gla+swa/sinks_with_rope": ("gla+swa/shared", op("attention", sinks_with_rope)),
    "gla+swa/no_sinks": ("gla+swa/shared", module_attr("sinks", None)),
    "gla+swa/window_w_keys": ("gla+swa/separate", module_attr("window", WINDOW - 1)),
    "gla+swa/no_g_norm": ("gla+swa/separate", module_attr("g_norm", nn.Identity())),
    "gla+swa/no_s_norm": ("gla+swa/shared", module_attr("s_norm", nn.Identity())),
    "gla+swa/kv_head_modulo": ("gla+swa/shared", op("chunk_gla", kv_head_modulo)),
    "gla+full/kv_head_modulo": ("gla+full/separate", op("attention", kv_head_modulo)),
    "gla+full/sinks_with_rope": ("gla+full/separate", op("attention", sinks_with_rope)),
    "gla+full/scale_1_over_d": ("gla+full/shared", op("attention", scale_one_over_d)),
    "gla+full/no_document_reset": ("gla+full/shared", op("attention", no_document_reset)),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_mutation_is_caught(mutation, monkeypatch):
    kind, apply = MUTATIONS[mutation]
    module = build(kind)
    ref = reference_output(kind, module, PACKED)
    assert matches(module, PACKED, ref)
    apply(monkeypatch, module)
    assert not matches(module, PACKED, ref), f"{mutation} went unnoticed"
