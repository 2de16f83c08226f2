"""Long-context evaluation of a trained model (`launch/evaluate.py`): held-out loss by position
and passkey retrieval.

    result = evaluate_long_context(checkpoint, data_path=SHARDS)   # then write_result(out, result)

**Loss by position.** `--samples` sequences of `seq_len` tokens (default 131072, clipped to
`model.max_position_embeddings`), one forward each (batch 1, positions 0 .. seq_len - 1). The loss
of the token at position t (predicted from the t tokens before it, t >= 1) goes to the bucket
holding t: [0, m), [m, 2m), [2m, 4m), ... up to seq_len (m = `first_bucket`, 1024 by default:
"0-1k", "1-2k", ..., "64-128k"). A falling loss over the late buckets says the model uses the
far context. Loss at late positions needs long *documents*: a sequence is the first seq_len
tokens of a document at least that long (seeded choice among them). When there are fewer such
documents than samples, the others are packed from contiguous shorter documents, run as one
context (positions go on across documents and their EOS), and `notes` says so: late positions
then only measure what unrelated earlier text is worth.
The logits are made from the final hidden states in chunks of positions
(`ops.loss.default_chunk_tokens`), so no [seq_len, vocab] fp32 tensor exists.

**Passkey.** For each length L (default 8k, 32k, 128k, clipped to the max positions) and each
of `trials` trials: a prompt of a repeated filler sentence with "The pass key is NNNNN. Remember
it." inserted at a random depth (whole sentences before it), ending with "What is the pass key?
The pass key is"; prompt plus answer tokens fill at most L tokens, at least L - one filler
sentence. The model decodes greedily as many tokens as " NNNNN" takes (a full forward per token;
there is no KV cache) and a trial is correct when the first run of digits it writes is the key.

Precision: fp32 on CPU, bf16 autocast over the fp32 weights on CUDA (as in training). Inputs are
checked first, each error naming the path or option: a missing checkpoint, shards from another
tokenizer, lengths above the max positions, data too short for the sequences asked for.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from data import open_sources, prepare_demo
from data.validation import validation_order
from data.shards import read_manifest
from data.tokenizer import Tokenizer, load_tokenizer
from model.context import SequenceContext
from ops.loss import default_chunk_tokens
from train.checkpoint import read_state, step_name
from analysis.evaluate import Loaded, autocast, data_config, load_model
from train.export import resolve_checkpoint

SEQ_LEN = 131072
PASSKEY_LENGTHS = (8192, 32768, 131072)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it."
QUESTION = "What is the pass key? The pass key is"


# --------------------------------------------------------------------------- the model


@torch.no_grad()
def hidden_states(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """ids [T] (one context, positions 0 .. T-1) -> final hidden states [T, hidden], before the
    final norm: the decoder's pieces (`embed`, blocks), so the head can run chunk by chunk."""
    positions = torch.arange(len(ids), device=ids.device)[None]
    ctx = SequenceContext.from_position_ids(positions)
    with autocast(ids.device):
        h = model.embed(ids[None], ctx)
        for block in model.layers:
            h, _ = block(h, ctx)
    return h[0]


@torch.no_grad()
def token_losses(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """ids [T] -> fp32 [T - 1]: entry t - 1 is the loss of token t given tokens 0 .. t-1."""
    h = hidden_states(model, ids)
    chunk = default_chunk_tokens(model.cfg.vocab_size)
    out = []
    for i in range(0, len(ids) - 1, chunk):
        j = min(i + chunk, len(ids) - 1)
        with autocast(ids.device):
            logits = model.head(h[i:j])
        out.append(F.cross_entropy(logits.float(), ids[i + 1:j + 1], reduction="none"))
    return torch.cat(out)


@torch.no_grad()
def next_token_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """ids [T] -> fp32 logits [vocab] of the token after them."""
    h = hidden_states(model, ids)[-1:]
    with autocast(ids.device):
        return model.head(h)[0].float()


def greedy_decode(model: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    """The `n` tokens greedy decoding appends to `ids`, re-running the whole context per token."""
    device = next(model.parameters()).device
    context = torch.tensor(ids, dtype=torch.long, device=device)
    out = []
    for _ in range(n):
        token = next_token_logits(model, context).argmax()
        out.append(int(token))
        context = torch.cat([context, token[None]])
    return out


# --------------------------------------------------------------------------- loss by position


def bucket_edges(seq_len: int, first: int = 1024) -> list[int]:
    """[0, first, 2 first, 4 first, ..., seq_len]: the bucket bounds of positions < seq_len."""
    edges = [0]
    while edges[-1] < seq_len:
        edges.append(min(max(2 * edges[-1], first), seq_len))
    return edges


def bucket_label(start: int, stop: int) -> str:
    """"1-2k" for [1024, 2048), "0-1k" for [0, 1024); bounds that are not both multiples of
    1024 stay numbers ("64-128")."""
    if start % 1024 == 0 and stop % 1024 == 0:
        return f"{start // 1024}-{stop // 1024}k"
    return f"{start}-{stop}"


@dataclass
class EvalSequence:
    """One evaluated context: `ids` int64 [seq_len] (CPU), from `documents` of source `source`."""

    ids: torch.Tensor
    source: str
    documents: list[int]

    @property
    def packed(self) -> bool:
        return len(self.documents) > 1


def select_sequences(sources, seq_len: int, samples: int, seed: int = 0,
                     documents: list | None = None) -> list[EvalSequence]:
    """`samples` sequences of `seq_len` tokens from `sources` (`DocumentSource`s): documents of
    >= seq_len tokens first (a seeded choice), then contiguous shorter documents packed together
    (module doc). documents: per source, the document ids to choose from (None: all; e.g. the
    held-out documents of the run's `data.val_docs`). ValueError when the data cannot give that many."""
    ids = [np.arange(len(src.doc_lengths)) if documents is None else np.sort(np.asarray(documents[i], np.int64))
           for i, src in enumerate(sources)]
    long = [(s, int(d)) for s, src in enumerate(sources) for d in ids[s][src.doc_lengths[ids[s]] >= seq_len]]
    order = np.random.default_rng(seed).permutation(len(long))[:samples]
    out = [EvalSequence(_tokens(sources[s], d, seq_len), sources[s].name, [d])
           for s, d in sorted(long[i] for i in order)]
    for s, src in enumerate(sources):
        parts, docs, have = [], [], 0
        for d in ids[s][src.doc_lengths[ids[s]] < seq_len]:
            if len(out) == samples:
                break
            take = min(int(src.doc_lengths[d]), seq_len - have)
            parts.append(_tokens(src, int(d), take))
            docs.append(int(d))
            have += take
            if have == seq_len:
                out.append(EvalSequence(torch.cat(parts), src.name, docs))
                parts, docs, have = [], [], 0
    if len(out) < samples:
        tokens = sum(int(src.doc_lengths[i].sum()) for src, i in zip(sources, ids))
        raise ValueError(f"the data holds {tokens:,} tokens ({len(long)} documents of >= {seq_len} "
                         f"tokens): not enough for --samples {samples} sequences of --seq-len "
                         f"{seq_len}; lower one of them or give more data")
    return out


def _tokens(source, doc: int, n: int) -> torch.Tensor:
    return torch.from_numpy(np.asarray(source.read(doc, 0, n), dtype=np.int64))


def loss_by_position(model: torch.nn.Module, sequences: list[EvalSequence], edges: list[int]) -> dict:
    """{bucket label: {"loss": mean loss, "tokens": count}} over `sequences`, by the position
    of the predicted token, for the buckets [edges[i], edges[i + 1])."""
    device = next(model.parameters()).device
    sums = np.zeros(len(edges) - 1)
    counts = np.zeros(len(edges) - 1, dtype=np.int64)
    for seq in sequences:
        losses = token_losses(model, seq.ids.to(device)).double().cpu()
        for b, (start, stop) in enumerate(zip(edges, edges[1:])):
            part = losses[max(start, 1) - 1:stop - 1]
            sums[b] += float(part.sum())
            counts[b] += len(part)
    return {bucket_label(a, z): {"loss": s / max(n, 1), "tokens": int(n)}
            for a, z, s, n in zip(edges, edges[1:], sums, counts)}


# --------------------------------------------------------------------------- passkey


@dataclass
class PasskeyPrompt:
    """ids: the prompt; the needle starts at token `key_at`, after a share `depth` of the
    filler sentences; `answer_tokens`: tokens to decode."""

    ids: list[int]
    key: str
    depth: float
    key_at: int
    answer_tokens: int


def passkey_prompt(tokenizer: Tokenizer, length: int, key: str, depth: float) -> PasskeyPrompt:
    """The prompt of `length` tokens at most (answer included) with `key` after the share `depth`
    (0..1, rounded to whole filler sentences) of the filler (module doc)."""
    filler, needle, question, key_ids = spaced_pieces(tokenizer, FILLER, NEEDLE.format(key=key),
                                                      QUESTION, key)
    answer = len(key_ids)
    sentences = (length - answer - len(needle) - len(question)) // len(filler)
    if sentences < 1:
        raise ValueError(f"--passkey-lengths {length}: too short for a passkey prompt, which needs "
                         f"more than {answer + len(needle) + len(question) + len(filler)} tokens")
    before = round(depth * sentences)
    ids = filler * before + needle + filler * (sentences - before) + question
    return PasskeyPrompt(ids, key, before / sentences, before * len(filler), answer)


def spaced_pieces(tokenizer: Tokenizer, *texts: str) -> list[list[int]]:
    """The token ids of each text, such that their concatenation reads as the texts joined by
    spaces: a sentencepiece model's word-start prefix gives the space already, a byte-level
    BPE (no such prefix) needs it written."""
    prefixed = tokenizer.decode(tokenizer.encode("a") + tokenizer.encode("b")) == "a b"
    return [tokenizer.encode(text if prefixed else " " + text) for text in texts]


def passkey_accuracy(model: torch.nn.Module, tokenizer: Tokenizer, lengths, trials: int,
                     seed: int = 0) -> dict:
    """{length: {"accuracy", "trials": [{key, depth, prompt_tokens, answer, correct}]}}; the key
    (5 digits) and depth of each trial are drawn from (seed, length, trial)."""
    out = {}
    for length in lengths:
        rows = []
        for trial in range(trials):
            rng = np.random.default_rng([seed, length, trial])
            prompt = passkey_prompt(tokenizer, length, str(rng.integers(10000, 100000)), rng.random())
            answer = tokenizer.decode(greedy_decode(model, prompt.ids, prompt.answer_tokens))
            digits = re.search(r"\d+", answer)
            rows.append({"key": prompt.key, "depth": prompt.depth, "prompt_tokens": len(prompt.ids),
                         "answer": answer, "correct": bool(digits) and digits.group() == prompt.key})
        out[length] = {"accuracy": sum(r["correct"] for r in rows) / trials, "trials": rows}
    return out


# --------------------------------------------------------------------------- the evaluation


def evaluate_long_context(checkpoint: str, *, data_path: str | None = None, seq_len: int | None = None,
                          samples: int = 8, first_bucket: int = 1024, passkey_lengths=None,
                          passkey_trials: int = 10, tokenizer: str | None = None,
                          device: str | torch.device = "cpu", seed: int = 0) -> dict:
    """The evaluation of the model at `checkpoint` (a training checkpoint, run directory or
    converted directory) on the documents of the token shards at `data_path` (None: the training
    run's own data: its held-out documents when it has a `data.val_docs` split, else documents it
    may have trained on). seq_len / passkey_lengths None: the defaults clipped to the
    model's max positions; given values above it are refused. `tokenizer`: the passkey prompts'
    tokenizer (None: the model's, see `model_tokenizer`). Returns the result (`write_result`)."""
    for option, value in (("--samples", samples), ("--passkey-trials", passkey_trials),
                          ("--first-bucket", first_bucket)):
        if value < 1:
            raise ValueError(f"{option} must be >= 1, got {value}")
    loaded = load_model(checkpoint, device)
    cfg, notes = loaded.model_cfg, []
    seq_len = _length("--seq-len", None if seq_len is None else [seq_len], [SEQ_LEN], loaded)[0]
    lengths = _length("--passkey-lengths", passkey_lengths, PASSKEY_LENGTHS, loaded)
    opened = open_sources(data_config(loaded, data_path))
    tok = model_tokenizer(loaded, tokenizer)
    for source in opened.sources:
        where = f"--data {data_path}" if data_path else f"the training data {source.name!r}"
        if source.fingerprint != tok.fingerprint:
            raise ValueError(f"{where} was tokenized by another tokenizer than {tok.path} (the passkey "
                             f"prompts'); prepare it with that tokenizer or pass --tokenizer")
        if source.max_token_id >= cfg.vocab_size:
            raise ValueError(f"{where} holds token id {source.max_token_id}, beyond the model's "
                             f"vocabulary of {cfg.vocab_size}")
    held_out = None
    val_docs = loaded.run.data.val_docs if loaded.run is not None and not data_path else 0
    if val_docs:  # the run's validation split: documents it never trained on
        held_out = [validation_order(src, val_docs) for src in opened.sources]
        notes.append(f"no --data: the sequences come from the {val_docs} documents per source the run "
                     f"held out (data.val_docs)")
    elif not data_path:
        notes.append("no --data: the sequences come from the training run's own data, not held-out text")
    sequences = select_sequences(opened.sources, seq_len, samples, seed, held_out)
    packed = sum(s.packed for s in sequences)
    if packed:
        notes.append(f"{packed} of {samples} sequences pack contiguous documents into one context "
                     f"(positions go on across them): too few documents of >= {seq_len} tokens")
    losses = loss_by_position(loaded.model, sequences, bucket_edges(seq_len, first_bucket))
    passkey = passkey_accuracy(loaded.model, tok, lengths, passkey_trials, seed)
    step = read_state(loaded.path)["step"] if loaded.run is not None else None
    return {
        "checkpoint": os.path.abspath(loaded.path), "model": cfg.name, "step": step,
        "device": str(device),
        "precision": "bf16 autocast" if torch.device(device).type == "cuda" else "fp32",
        "data": {"source": "--data" if data_path else ("held out" if held_out else "training run"),
                 "sources": [s.name for s in opened.sources], "seq_len": seq_len, "samples": samples,
                 "packed": packed, "seed": seed,
                 "sequences": [{"source": s.source, "documents": s.documents} for s in sequences]},
        "loss_by_position": {b: v["loss"] for b, v in losses.items()},
        "tokens_by_position": {b: v["tokens"] for b, v in losses.items()},
        "passkey": {str(n): v["accuracy"] for n, v in passkey.items()},
        "passkey_trials": {str(n): v["trials"] for n, v in passkey.items()},
        "tokenizer": str(tok.path), "notes": notes,
    }


def _length(option: str, given, defaults, loaded: Loaded) -> list[int]:
    """The lengths asked for, or the defaults clipped to the model's max positions (no repeats)."""
    limit = loaded.model_cfg.max_position_embeddings
    if given is None:
        return sorted({min(n, limit) for n in defaults})
    for n in given:
        if not 2 <= n <= limit:
            raise ValueError(f"{option} {n}: must be within 2 .. {limit}, the max_position_embeddings "
                             f"of {loaded.path}")
    return list(given)


def model_tokenizer(loaded: Loaded, path: str | None = None) -> Tokenizer:
    """The tokenizer of the model's tokens: `path` (--tokenizer), else the tokenizer files of a
    converted directory, else the training run's: data.tokenizer, the demo's, or the one its
    shards were made with. Errors say to pass --tokenizer."""
    try:
        if path:
            return load_tokenizer(path)
        if loaded.run is None:
            return load_tokenizer(loaded.path)
        data = loaded.run.data
        if data.tokenizer:
            return load_tokenizer(data.tokenizer)
        if data.name == "demo":
            return prepare_demo(data).tokenizer
        return load_tokenizer(read_manifest(data.source_specs()[0].path)["tokenizer"]["path"])
    except (OSError, ValueError) as e:
        where = f"--tokenizer {path}" if path else loaded.path
        raise ValueError(f"{where}: cannot load the tokenizer for the passkey prompts ({e}); "
                         f"pass --tokenizer") from None


def default_out(checkpoint: str) -> str:
    """`RUN_DIR/eval/step_NNNNNNNN.json` for a training checkpoint (a run directory stands for
    its newest one), where `launch/report.py` reads it; `DIR/eval/long_context.json` for a
    converted directory."""
    if os.path.isfile(os.path.join(checkpoint, "config.json")):
        return os.path.join(os.path.abspath(checkpoint), "eval", "long_context.json")
    path = os.path.abspath(resolve_checkpoint(checkpoint))
    folder = os.path.dirname(path)
    run_dir = os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else folder
    return os.path.join(run_dir, "eval", f"{step_name(read_state(path)['step'])}.json")


def check_out(out: str, overwrite: bool = False) -> str:
    """The absolute path of output file `out`, which must not exist unless `overwrite`."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    return out


def write_result(out: str, result: dict, overwrite: bool = False) -> str:
    """Writes `result` as JSON to `out` atomically (the report may be reading the folder);
    an existing file needs `overwrite`. Returns the absolute path."""
    out = check_out(out, overwrite)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    os.replace(tmp, out)
    return out
