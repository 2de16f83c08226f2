"""Tokenizer files of an export, so that `AutoTokenizer.from_pretrained(DST)` loads them.

`write_tokenizer(src, dst)` takes a tokenizer as `data.tokenizer` names one: a Hugging Face
`tokenizer.json` (or a checkpoint folder holding it, e.g. Qwen's), whose files are copied as they
are; or a sentencepiece `.model` (the demo corpus' and `launch/prepare_data.py --train-tokenizer`
ones), copied and also converted to a `tokenizer.json` that encodes and decodes exactly as
sentencepiece does. Built with `tokenizers` and `sentencepiece` alone (transformers is not needed).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from .checkpoint import copy_tokenizer_files, write_json

PIECE_CONTROL, PIECE_USER_DEFINED = 3, 4  # sentencepiece ModelProto.SentencePiece.Type
UNIGRAM = 1  # sentencepiece TrainerSpec.ModelType


def write_tokenizer(src: str, dst: str) -> list[str]:
    """Writes the tokenizer SRC (a tokenizer.json or sentencepiece .model file, or a folder holding
    either) into DST. Adds a `tokenizer_config.json` (PreTrainedTokenizerFast) when SRC has none,
    and for a sentencepiece model a `tokenizer.json` and a `generation_config.json` carrying its
    BOS/EOS ids. A sentencepiece model other than unigram is copied but not converted. Returns
    the files written."""
    path = Path(src)
    if path.is_file() and path.name != "tokenizer.json":
        name = "tokenizer.model" if path.suffix == ".model" else "tokenizer.json"
        shutil.copyfile(path, os.path.join(dst, name))
        written = [name]
    else:
        written = copy_tokenizer_files(str(path.parent if path.is_file() else path), dst)
    if "tokenizer_config.json" in written:
        return written
    if "tokenizer.json" in written:
        write_json(os.path.join(dst, "tokenizer_config.json"), {"tokenizer_class": "PreTrainedTokenizerFast"})
        return written + ["tokenizer_config.json"]
    if "tokenizer.model" in written:
        written += sentencepiece_to_hf(os.path.join(dst, "tokenizer.model"), dst)
    return written


def sentencepiece_to_hf(model_file: str, dst: str) -> list[str]:
    """A unigram sentencepiece model -> DST/tokenizer.json, tokenizer_config.json and
    generation_config.json (its ids). Follows the model's own normaliser settings (character
    map, extra-whitespace removal, dummy prefix, whitespace escaping), keeps user-defined pieces
    whole and decodes control pieces to nothing, as sentencepiece does. Returns the files written
    ([] for a model type other than unigram)."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import Unigram

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if spec.model_type != UNIGRAM:
        return []
    tok = Tokenizer(Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=spec.unk_id,
                            byte_fallback=spec.byte_fallback))
    steps = [normalizers.Precompiled(norm.precompiled_charsmap)] if norm.precompiled_charsmap else []
    if norm.remove_extra_whitespaces:  # spaces only: sentencepiece leaves newlines alone
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:  # on the whole text, once (not after every user-defined piece)
        steps.append(normalizers.Prepend(" "))
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    user = sorted((p.piece for p in proto.pieces if p.type == PIECE_USER_DEFINED), key=len, reverse=True)
    if user:
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("|".join(map(re.escape, user))), behavior="isolated")
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else []))
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for i, p in enumerate(proto.pieces) if p.type == PIECE_CONTROL or i == spec.unk_id])
    tok.save(os.path.join(dst, "tokenizer.json"))
    ids = {"bos": spec.bos_id, "eos": spec.eos_id, "unk": spec.unk_id, "pad": spec.pad_id}
    ids = {k: i for k, i in ids.items() if 0 <= i < len(proto.pieces)}
    write_json(os.path.join(dst, "tokenizer_config.json"),
               {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                **{f"{k}_token": proto.pieces[i].piece for k, i in ids.items()}})
    write_json(os.path.join(dst, "generation_config.json"),
               {f"{k}_token_id": ids[k] for k in ("bos", "eos", "pad") if k in ids})
    return ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
