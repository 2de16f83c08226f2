"""Qwen2 -> SpikingBrain conversion: streaming reader/writer, sb7b and sb76b rules, loading back,
round trip, training from the result, and bad inputs."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from model import SequenceContext, build_model
from model.convert import ROUTER_STD, convert, save_hf_checkpoint, upcycle_alpha
from model.hf import CheckpointError, HFCheckpoint, load_hf_checkpoint, load_into
from model.hf.spikingbrain import _expected_shapes, to_hf_name
from tests import helpers
from tests.helpers import ROOT, model_config

VOCAB, LAYERS = 503, 8
SB7B, SB76B = model_config("sb7b"), model_config("sb76b")


def tiny_qwen2(seed=0):
    return helpers.tiny_qwen2(seed, vocab_size=VOCAB, num_layers=LAYERS)


@pytest.fixture(scope="module")
def hf_model():
    return tiny_qwen2()


@pytest.fixture(scope="module")
def sources(hf_model, tmp_path_factory):
    """{format: directory} for the same weights saved four ways."""
    base = tmp_path_factory.mktemp("src")
    out = {}
    for name, kw in {"safetensors": {}, "safetensors-sharded": {"max_shard_size": "300KB"}}.items():
        hf_model.save_pretrained(base / name, **kw)
        out[name] = str(base / name)
    # transformers 5 only writes safetensors: write the pytorch .bin layouts by hand
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    for name, nfiles in (("bin", 1), ("bin-sharded", 3)):
        d = base / name
        os.makedirs(d)
        hf_model.config.save_pretrained(d)
        if nfiles == 1:
            torch.save(state, d / "pytorch_model.bin")
        else:
            keys, weight_map = list(state), {}
            for i in range(nfiles):
                fname = f"pytorch_model-{i + 1:05d}-of-{nfiles:05d}.bin"
                part = keys[i::nfiles]
                torch.save({k: state[k] for k in part}, d / fname)
                weight_map.update({k: fname for k in part})
            with open(d / "pytorch_model.bin.index.json", "w") as f:
                json.dump({"metadata": {}, "weight_map": weight_map}, f)
        out[name] = str(d)
    for d in out.values():
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump({"model_max_length": 512}, f)
    assert os.path.exists(os.path.join(out["bin"], "pytorch_model.bin"))
    assert os.path.exists(os.path.join(out["safetensors-sharded"], "model.safetensors.index.json"))
    assert os.path.exists(os.path.join(out["bin-sharded"], "pytorch_model.bin.index.json"))
    return out


@pytest.fixture(scope="module")
def sb7b_dir(sources, tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("out") / "sb7b")
    convert(sources["safetensors"], dst, SB7B, "sb7b", dtype=torch.float32)
    return dst


@pytest.fixture(scope="module")
def sb76b_dir(sources, tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("out") / "sb76b")
    convert(sources["safetensors"], dst, SB76B, "sb76b", dtype=torch.float32)
    return dst


def read_all(path):
    ckpt = HFCheckpoint(path)
    return {k: ckpt.get(k) for k in ckpt.keys()}


def test_upcycle_alpha_paper_setting():
    assert round(upcycle_alpha(1, 1, 16), 2) == 0.98
    assert upcycle_alpha(1, 1, 1) == pytest.approx(0.5 ** (1 / 3))


OFFICIAL_7B = re.compile(r"^(lm_head\.weight|model\.(embeddings|norm)\.weight|model\.layers\.\d+\.("
                         r"attn_norm\.weight|mlp_norm\.weight|attn\.[qkv]_proj\.(weight|bias)|"
                         r"attn\.o_proj\.weight|attn\.gk_proj\.0\.weight|attn\.gk_proj\.1\.(weight|bias)|"
                         r"attn\.g_norm\.weight|mlp\.(gate|up|down)_proj\.weight))$")


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "safetensors-sharded", "bin-sharded"])
def test_sb7b_every_tensor_accounted(fmt, sources, sb7b_dir, hf_model, tmp_path):
    dst = str(tmp_path / "dst")
    summary = convert(sources[fmt], dst, SB7B, "sb7b", dtype=torch.float32, max_shard_size="100KB")
    assert summary["shards"] > 1 and summary["dropped"] == []
    assert "tokenizer_config.json" in os.listdir(dst)
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "gla_swa" and cfg["attn_layers"] == [1, 3, 5, 7]
    assert cfg["sliding_window"] == 4096 and cfg["hidden_act"] == "swish" and not cfg["use_short_conv"]
    out = read_all(dst)
    target_cfg, _ = load_hf_checkpoint(dst, dtype=None)
    assert set(out) == {to_hf_name(k) for k in _expected_shapes(target_cfg)}
    assert all(OFFICIAL_7B.match(k) for k in out), [k for k in out if not OFFICIAL_7B.match(k)]
    # every source tensor reused where the rules say
    src = hf_model.state_dict()
    rename = {"model.embed_tokens.": "model.embeddings.", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "mlp_norm", "self_attn.": "attn."}
    for k, v in src.items():
        if "rotary" in k:
            continue
        new = k
        for a, b in rename.items():
            new = new.replace(a, b)
        assert torch.equal(out[new], v), k
    for i in range(LAYERS):
        p = f"model.layers.{i}.attn."
        if i % 2 == 0:
            assert out[p + "gk_proj.0.weight"].shape == (16, 96)
            assert out[p + "gk_proj.1.weight"].shape == (32, 16)
            assert torch.equal(out[p + "gk_proj.1.bias"], torch.zeros(32))
            assert torch.equal(out[p + "g_norm.weight"], torch.ones(16))
            bound = 2 ** -2.5 * (6 / (16 + 96)) ** 0.5  # xavier-uniform bound, gain 2^-2.5
            assert out[p + "gk_proj.0.weight"].abs().max() <= bound
        else:
            assert p + "gk_proj.0.weight" not in out
    # deterministic new parameters, whatever the source format and sharding
    ref = read_all(sb7b_dir)
    assert set(ref) == set(out) and all(torch.equal(ref[k], out[k]) for k in ref)


def test_sb7b_swa_layer_reproduces_qwen_attention(sb7b_dir, hf_model):
    model = build_model(model_config("sb7b", **_dims(sb7b_dir)), init=False).eval()
    load_into(model, sb7b_dir)
    captured = {}

    def hook(mod, args, kwargs, output):
        captured["x"] = kwargs.get("hidden_states", args[0] if args else None)
        captured["y"] = output[0]

    layer = 3
    handle = hf_model.model.layers[layer].self_attn.register_forward_hook(hook, with_kwargs=True)
    ids = torch.randint(0, VOCAB, (2, 37))
    with torch.no_grad():
        hf_model(ids)
        handle.remove()
        ctx = SequenceContext.from_position_ids(torch.arange(37).expand(2, 37))
        assert model.layers[layer].mixer_name == "swa"
        got = model.layers[layer].attn(captured["x"], ctx)
    assert (got - captured["y"]).abs().max().item() <= 1e-5


def _dims(path):
    """Overrides turning conf/model/sb7b|sb76b.yaml into the tiny converted model's config."""
    cfg, _ = load_hf_checkpoint(path, dtype=None)
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size)


def test_sb76b_layout_and_upcycling(sb76b_dir, hf_model):
    cfg, state = load_hf_checkpoint(sb76b_dir)
    assert cfg.mixers == ["gla+swa"] * 6 + ["gla+full", "gla+swa"]
    assert cfg.ffns == ["dense", "dense", "dense", "moe", "dense", "moe", "dense", "moe"]
    src = hf_model.state_dict()
    alpha = upcycle_alpha(1, 1, 16)
    for i in range(LAYERS):  # both branches share the source attention
        for n in ("q", "k", "v"):
            assert torch.equal(state[f"layers.{i}.attn.{n}_proj.bias"], src[f"model.layers.{i}.self_attn.{n}_proj.bias"])
        assert torch.equal(state[f"layers.{i}.attn.o_proj.weight"], src[f"model.layers.{i}.self_attn.o_proj.weight"])
        assert torch.equal(state[f"layers.{i}.attn.s_norm.weight"], torch.ones(16))
        assert state[f"layers.{i}.attn.sinks"].shape == (128, 96)
        assert 0.01 < state[f"layers.{i}.attn.sinks"].std() < 0.03
    model = build_model(cfg, init=False).eval()
    model.load_state_dict(state, strict=True)
    moe = model.layers[3].mlp
    dense = {n: src[f"model.layers.3.mlp.{n}_proj.weight"] for n in ("gate", "up", "down")}
    for n in ("gate", "up", "down"):
        experts = getattr(moe.experts, f"{n}_proj")
        assert all(torch.equal(experts[e], experts[0]) for e in range(16))
        torch.testing.assert_close(experts[0], alpha * dense[n])
        torch.testing.assert_close(getattr(moe.shared, f"{n}_proj").weight, alpha * dense[n])
    assert moe.router.weight.std() < 2 * ROUTER_STD
    x = torch.randn(2, 11, 96)
    with torch.no_grad():
        y, stats = moe(x)
        p_top1 = F.softmax(moe.router(x), -1).max(-1).values[..., None]
        ffn = lambda h: F.linear(F.silu(F.linear(h, alpha * dense["gate"])) * F.linear(h, alpha * dense["up"]),  # noqa: E731
                                 alpha * dense["down"])
        expected = ffn(x) + p_top1 * ffn(x)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(stats.balance_loss())


@pytest.mark.parametrize("which", ["sb7b", "sb76b"])
def test_load_back_round_trip_and_training(which, sb7b_dir, sb76b_dir, tmp_path):
    path = {"sb7b": sb7b_dir, "sb76b": sb76b_dir}[which]
    written = read_all(path)
    cfg, _ = load_hf_checkpoint(path, dtype=None)
    model = build_model(cfg, init=False)
    load_into(model, path)
    state = model.state_dict()
    assert set(map(to_hf_name, state)) == set(written)
    assert all(torch.equal(state[k], written[to_hf_name(k)]) for k in state)
    # round trip: DST -> model -> save -> identical tensors and config
    again = str(tmp_path / "again")
    save_hf_checkpoint(state, cfg, again, dtype=torch.float32, max_shard_size="200KB")
    back = read_all(again)
    assert set(back) == set(written) and all(torch.equal(back[k], written[k]) for k in back)
    with open(os.path.join(path, "config.json")) as a, open(os.path.join(again, "config.json")) as b:
        assert json.load(a) == json.load(b)
    # the converted model trains: finite loss that falls on a fixed batch
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        out = model(ids[:, :-1], labels=ids[:, 1:])
        loss = out.loss_sum / out.num_tokens + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_load_checks_dims_against_config(sb7b_dir, sb76b_dir):
    with pytest.raises(ValueError, match=r"model.hidden_size=128 but .*config.json has hidden_size=96"):
        load_hf_checkpoint(sb7b_dir, model_config("sb7b-tiny", vocab_size=VOCAB))
    cfg = model_config("sb7b", **_dims(sb7b_dir))
    got, state = load_hf_checkpoint(sb7b_dir, cfg)
    assert got is cfg and state["embeddings.weight"].dtype == torch.float32
    with pytest.raises(ValueError, match="model.mixers"):
        load_hf_checkpoint(sb7b_dir, load_hf_checkpoint(sb76b_dir, dtype=None)[0])


def test_bf16_default_and_cli(sources, tmp_path):
    dst = tmp_path / "cli"
    run = lambda *a: subprocess.run([sys.executable, os.path.join(ROOT, "launch", "convert.py"), *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    r = run(sources["bin"], str(dst), "--target", "sb7b", "--sliding-window", "64", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["peak_rss_mb"] > 0 and summary["dtype"] == "bfloat16"
    out = read_all(str(dst))
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    assert json.load(open(dst / "config.json"))["sliding_window"] == 64
    r = run(sources["bin"], str(dst), "--target", "sb7b")
    assert r.returncode == 1 and "already exists" in r.stderr and "--overwrite" in r.stderr


# -- bad inputs: a clear error naming the file, and no DST (complete or partial) left behind --------
def _broken_copy(src, tmp_path, edit):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    edit(bad)
    return str(bad)


def _edit_config(**changes):
    def edit(d):
        with open(d / "config.json") as f:
            cfg = json.load(f)
        cfg.update(changes)
        with open(d / "config.json", "w") as f:
            json.dump(cfg, f)
    return edit


@pytest.mark.parametrize("case,edit,match", [
    ("no-config", lambda d: os.remove(d / "config.json"), r"config.json: missing"),
    ("garbage-weights", lambda d: (d / "model.safetensors").write_bytes(b"not a tensor file"),
     r"model.safetensors: unreadable weight file"),
    ("no-weights", lambda d: os.remove(d / "model.safetensors"), r"no weight files"),
    ("llama", _edit_config(model_type="llama"), r"config.json: unknown architecture model_type='llama'"),
    ("kv-heads", _edit_config(num_key_value_heads=4), r"config.json: num_attention_heads=6 is not divisible by num_key_value_heads=4"),
    ("heads", _edit_config(num_attention_heads=7), r"config.json: hidden_size=96 is not divisible by num_attention_heads=7"),
])
def test_bad_sources(case, edit, match, sources, tmp_path):
    bad = _broken_copy(sources["safetensors"], tmp_path, edit)
    out = tmp_path / "out"
    os.makedirs(out)
    with pytest.raises((CheckpointError, ValueError), match=match):
        convert(bad, str(out / "dst"), SB7B, "sb7b")
    assert os.listdir(out) == []


def test_missing_shard_named(sources, tmp_path):
    def edit(d):
        os.remove(d / sorted(f for f in os.listdir(d) if f.startswith("model-"))[-1])
    bad = _broken_copy(sources["safetensors-sharded"], tmp_path, edit)
    with pytest.raises(CheckpointError, match=r"model-\d+-of-\d+.safetensors: missing"):
        convert(bad, str(tmp_path / "dst"), SB7B, "sb7b")
    assert not os.path.exists(tmp_path / "dst")


def test_existing_dst_untouched_and_overwrite(sources, tmp_path):
    dst = tmp_path / "dst"
    os.makedirs(dst)
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert(sources["safetensors"], str(dst), SB7B, "sb7b")
    assert os.listdir(dst) == ["keep.txt"] and (dst / "keep.txt").read_text() == "mine"
    convert(sources["safetensors"], str(dst), SB7B, "sb7b", overwrite=True)
    assert "keep.txt" not in os.listdir(dst) and "config.json" in os.listdir(dst)
    assert sorted(os.listdir(tmp_path)) == ["dst"]  # no temporary or old directories left


def test_failure_mid_write_leaves_nothing(sources, tmp_path, monkeypatch):
    from model.hf import checkpoint

    def boom(self):
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint.ShardWriter, "finish", boom)
    with pytest.raises(OSError, match="disk full"):
        convert(sources["safetensors"], str(tmp_path / "dst"), SB7B, "sb7b", max_shard_size="100KB")
    assert os.listdir(tmp_path) == []
