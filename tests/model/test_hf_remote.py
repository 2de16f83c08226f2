"""Exports through `AutoModelForCausalLM.from_pretrained(DST, trust_remote_code=True)`: the
project's own modeling files (model/hf/remote/) give the project's logits, greedy generation,
beam scores and left-padded batches; the cache keeps GLA state constant and SWA capped at the
window; the project still reads the export; tokenizer files load with AutoTokenizer."""
import ast
import dataclasses
import inspect
import json
import os
import sys

import pytest
import torch
from packaging.version import Version

transformers = pytest.importorskip("transformers")

from data.tokenizer import train_sentencepiece
from model import build_model
from model.config import SpikeConfig
from model.convert import convert, save_hf_checkpoint
from model.hf import load_hf_checkpoint, load_into
from model.hf.remote import FILES, write_remote_code
from model.hf.spikingbrain import hf_config
from model.hf.tokenizer import write_tokenizer
from tests import helpers
from tests.helpers import model_config

WINDOW = 64  # sliding_window of the tiny configs: every sequence below is longer
# from_pretrained's dtype argument (torch_dtype before 4.56), so the file also runs on 4.45 ... 5.x
FP32 = {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": torch.float32}
VARIANTS = {
    "sb7b-tiny": lambda: model_config("sb7b-tiny"),
    "sb76b-tiny": lambda: model_config("sb76b-tiny"),
    # separate GLA projections, a tied head, full attention without sinks
    "sb76b-tiny-unshared-tied": lambda: model_config(
        "sb76b-tiny", tie_word_embeddings=True, hybrid={"shared_qkvo": False, "num_sinks": 0},
        layer_plan={"mixer": ["gla+swa", "full", "swa", "gla"], "ffn": ["moe", "dense"]}),
    "sb76b-tiny-spiking": lambda: model_config(
        "sb76b-tiny", spike={"enabled": True, "k": 3.0, "targets": ["attn", "mlp", "experts", "router", "head"]}),
}


def randomize(model, seed=0):
    """Weights of unit-scale signals (fan-in scaled), norms near one, small biases: every tensor
    changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            mean, std = (1.0, 0.1) if "norm" in name else (0.0, 0.1 if name.endswith("bias") else p.shape[-1] ** -0.5)
            p.copy_(torch.randn(p.shape, generator=gen) * std + mean)
    return model.eval()


def export(cfg, dst):
    """(project model with random weights, its export at DST loaded by AutoModelForCausalLM)."""
    model = randomize(build_model(cfg))
    save_hf_checkpoint(model.state_dict(), cfg, dst, dtype=torch.float32)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(dst, trust_remote_code=True, output_loading_info=True,
                                                                 **FP32)
    return model, hf.eval(), info


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = export(VARIANTS[name](), str(tmp_path_factory.mktemp("export") / name))
        return cache[name]
    return get


def ids(b, t, seed=0):
    return torch.randint(0, 2048, (b, t), generator=torch.Generator().manual_seed(seed))


def greedy(model, prompt, steps):
    """Greedy decoding with the project's model, the full forward again for every token."""
    with torch.no_grad():
        for _ in range(steps):
            prompt = torch.cat([prompt, model(prompt).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return prompt


def returned_cache(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


def test_remote_files_import_only_torch_transformers_and_stdlib():
    root = os.path.join(helpers.ROOT, "model", "hf", "remote")
    for name in FILES:
        with open(os.path.join(root, name)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = ["." + node.module if node.level else node.module]
            else:
                continue
            allowed = {"torch", "transformers"} | sys.stdlib_module_names
            for mod in mods:
                assert mod == ".configuration_spikingbrain" or mod.split(".")[0] in allowed, f"{name} imports {mod}"


@pytest.mark.parametrize("name", ["sb7b-tiny", "sb76b-tiny"])
def test_export_carries_remote_code_and_project_still_reads_it(name, exported, tmp_path):
    model, hf, _ = exported(name)
    dst = hf.config.name_or_path
    assert set(FILES) <= set(os.listdir(dst))
    with open(os.path.join(dst, "config.json")) as f:
        written = json.load(f)
    auto_map = written.pop("auto_map")
    assert written == hf_config(model.cfg, torch.float32)  # every field kept
    assert written["model_type"] == {"sb7b-tiny": "gla_swa", "sb76b-tiny": "spikingbrain_moe"}[name]
    assert auto_map["AutoModelForCausalLM"] == "modeling_spikingbrain." + written["architectures"][0]
    # the loader checks every setting against model.cfg (ValueError naming a difference)
    for folder in (dst, str(tmp_path / "saved")):  # also as saved by transformers (after fine-tuning there)
        if folder != dst:
            hf.save_pretrained(folder)
        _, state = load_hf_checkpoint(folder, model.cfg)
        assert state.keys() == model.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_logits_match_project_model(name, exported, monkeypatch):
    model, hf, info = exported(name)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    # no rotary (or other) buffers that meta-device initialisation could leave unset
    assert dict(hf.named_buffers()) == {}
    x = ids(2, WINDOW + 30)
    far = torch.arange(5000, 5000 + x.shape[1]).expand_as(x)  # RoPE far from position 0
    remote = sys.modules[type(hf).__module__]
    with torch.no_grad():
        for pos, block in ((None, remote.QUERY_BLOCK), (far, 16)):  # 16: query blocks inside the window
            monkeypatch.setattr(remote, "QUERY_BLOCK", block)
            ref, got = model(x, position_ids=pos).logits, hf(x, position_ids=pos).logits
            assert ref.abs().max() > 1.0  # logits large enough for the comparison to mean something
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    if model.cfg.spike.enabled:  # spiking changes the result: the export did not just drop it
        plain = build_model(dataclasses.replace(model.cfg, spike=SpikeConfig()), init=False).eval()
        plain.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (plain(x).logits - got).abs().max() > 0.1


@pytest.mark.parametrize("name", ["sb7b-tiny", "sb76b-tiny"])
def test_generate_uses_constant_gla_state_and_capped_swa_cache(name, exported):
    model, hf, _ = exported(name)
    prompt, steps = ids(2, WINDOW + 6, seed=1), 8
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps, do_sample=False,
                      pad_token_id=0, return_dict_in_generate=True)
    assert torch.equal(out.sequences, greedy(model, prompt, steps))
    one = returned_cache(hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1,
                                     do_sample=False, pad_token_id=0, return_dict_in_generate=True))
    cache = returned_cache(out)
    fed = prompt.shape[1] + steps - 1  # the last token is never fed back
    assert cache.get_seq_length() == fed and one.get_seq_length() == prompt.shape[1]
    kv_heads, head_dim = model.cfg.num_kv_heads, model.cfg.head_dim
    for i, (mixer, layer, first) in enumerate(zip(model.cfg.mixers, cache.layers, one.layers)):
        if "gla" in mixer:
            assert layer["state"].shape == first["state"].shape == (2, kv_heads, head_dim, head_dim), i
        if mixer.endswith("swa"):
            assert layer["k"].shape == layer["v"].shape == (2, WINDOW, kv_heads, head_dim), i
        if mixer.endswith("full"):
            assert layer["k"].shape[1] == fed, i
        assert ("k" in layer) == (mixer != "gla"), i


@pytest.mark.parametrize("name", ["sb7b-tiny", "sb76b-tiny"])
def test_left_padded_batch_equals_prompts_one_by_one(name, exported):
    model, hf, _ = exported(name)
    a, b, pad = ids(1, WINDOW + 10, seed=2), ids(1, WINDOW - 10, seed=3), 20
    batch = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    out = hf.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out[0], greedy(model, a, 4)[0]) and torch.equal(out[1, pad:], greedy(model, b, 4)[0])


def test_beam_search_reorders_every_kind_of_cache(exported):
    """Each beam's score equals its log-probability under the project model (sb76b-tiny: GLA
    states, SWA and full-attention keys are all reordered)."""
    model, hf, _ = exported("sb76b-tiny")
    a = ids(1, WINDOW + 10, seed=2)
    res = hf.generate(a, attention_mask=torch.ones_like(a), max_new_tokens=4, num_beams=3, num_return_sequences=3,
                      do_sample=False, length_penalty=0.0, pad_token_id=0, return_dict_in_generate=True,
                      output_scores=True)
    with torch.no_grad():
        logp = model(res.sequences).logits.log_softmax(-1)[:, a.shape[1] - 1:-1]
    expected = logp.gather(-1, res.sequences[:, a.shape[1]:, None]).sum((1, 2))
    torch.testing.assert_close(res.sequences_scores, expected, atol=1e-4, rtol=1e-4)


def test_cache_continues_several_tokens_and_reorders_rows(exported):
    """Direct use of the cache: a 3-token step after a left-padded prompt, rows swapped between."""
    model, hf, _ = exported("sb76b-tiny")
    a, b, pad = ids(1, WINDOW - 14, seed=4), ids(1, WINDOW - 34, seed=5), 20
    batch = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    new = ids(2, 3, seed=6)
    with torch.no_grad():
        cache = returned_cache(hf(batch, attention_mask=mask, use_cache=True))
        step = hf.prepare_inputs_for_generation(torch.cat([batch, new], 1), past_key_values=cache)
        assert torch.equal(step["input_ids"], new)  # only the tokens the cache has not seen
        cache.reorder_cache(torch.tensor([1, 0]))
        got = hf(new.flip(0), past_key_values=cache).logits
        ref = [model(torch.cat([p, n[None]], 1)).logits[0, -3:] for p, n in ((b, new[1]), (a, new[0]))]
    torch.testing.assert_close(got, torch.stack(ref), atol=1e-4, rtol=1e-4)


def test_converted_qwen_export_loads(tmp_path):
    """launch/convert.py's path (Qwen2 -> sb7b-tiny plan) carries the modeling files too."""
    qwen = helpers.tiny_qwen2(vocab_size=300, num_layers=2)
    qwen.save_pretrained(tmp_path / "qwen")
    dst = str(tmp_path / "sb7b")
    convert(str(tmp_path / "qwen"), dst, model_config("sb7b-tiny"), "sb7b-tiny", dtype=torch.float32)
    cfg, _ = load_hf_checkpoint(dst)
    model = build_model(cfg, init=False).eval()
    load_into(model, dst)
    hf = transformers.AutoModelForCausalLM.from_pretrained(dst, trust_remote_code=True, **FP32)
    x = ids(1, 40) % 300
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x).logits, atol=1e-4, rtol=1e-4)


def test_write_remote_code_needs_a_spikingbrain_layout(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ValueError, match="model_type 'qwen2' has no SpikingBrain modeling code"):
        write_remote_code(str(tmp_path))


def test_tokenizer_files_load_with_autotokenizer(tmp_path):
    """A sentencepiece model (as the demo data trains) becomes a tokenizer.json that encodes and
    decodes as sentencepiece does; a bare tokenizer.json gets a tokenizer_config.json."""
    docs = [inspect.getdoc(f) or "" for f in vars(os).values() if callable(f)]
    sp = train_sentencepiece(docs, 400, tmp_path / "sp" / "tokenizer.model")
    texts = ["", " x", "two  spaces\n\n  and a tab\t end ", "ünïcödé 日本 🙂"] + docs[:50]
    cfg = model_config("sb7b-tiny")  # an export given the .model (as the trainer's --export would)
    save_hf_checkpoint(build_model(cfg).state_dict(), cfg, str(tmp_path / "out0"), tokenizer_from=str(sp.path))
    (tmp_path / "out1").mkdir()  # the folder holding the .model
    assert write_tokenizer(str(sp.path.parent), str(tmp_path / "out1")) == [
        "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    for dst in (tmp_path / "out0", tmp_path / "out1"):
        # transformers 5 reads config.json first, which names the remote code
        tok = transformers.AutoTokenizer.from_pretrained(dst, trust_remote_code=True)
        for t in texts:
            assert tok.encode(t, add_special_tokens=False) == sp.encode(t), t
            assert tok.decode(sp.encode(t) + [sp.eos_id], skip_special_tokens=True) == sp.decode(sp.encode(t)), t
        assert tok.eos_token_id == sp.eos_id
        assert json.loads((dst / "generation_config.json").read_text())["eos_token_id"] == sp.eos_id
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_text((tmp_path / "out0" / "tokenizer.json").read_text())
    dst = tmp_path / "out_bare"
    dst.mkdir()
    assert write_tokenizer(str(bare / "tokenizer.json"), str(dst)) == ["tokenizer.json", "tokenizer_config.json"]
    tok = transformers.AutoTokenizer.from_pretrained(dst)
    assert tok.encode("two words", add_special_tokens=False) == sp.encode("two words")
