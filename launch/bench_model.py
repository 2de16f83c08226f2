"""Block and model speed on CUDA: a full training step (bf16 autocast, fused AdamW), side by side.

    python launch/bench.py model +model=sb7b model.num_layers=4 --seq 8192 32768 --out model.json
    python launch/bench.py model +model=qwen2.5-7b model.num_layers=4 --seq 8192 --hf --out qwen.json
    python launch/bench.py model +model=sb7b model.num_layers=4 --seq 8192 --median 1024   # packed docs
    python launch/bench.py layer +model=sb76b --seq 8192 --out layer.json

`model`: one optimizer step per iteration on one sequence of each length (`--median M` packs
log-normal documents of median M tokens, as the launcher's packing does), with
`--recompute none|full|selective` and `--compile none|regions` (`train.compile`; the first
step's extra time, compilation included, is the `first s` column); `--hf` also times Hugging Face `Qwen2ForCausalLM` built from the
same config (Qwen models, one document: its SDPA path has no document masking).
`layer`: forward+backward of the first block of each distinct (mixer, FFN) kind in the layer plan.
Columns: median ms, tokens/s, useful TFLOP/s and MFU (`model.flops`, device bf16 peak), peak GiB.
Takes the Hydra overrides of launch/pretrain.py for the model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_util import cu_seqlens_of, cuda_ms, document_lengths, print_table, require_cuda, write_json  # noqa: E402
from pretrain import load_config  # noqa: E402

COLUMNS = [("mode", "mode", "s"), ("system", "system", "s"), ("tokens", "tokens", "d"), ("docs", "docs", "s"),
           ("ms", "ms", ".1f"), ("tokens_per_s", "tok/s", ",.0f"), ("tflops", "TFLOP/s", ".0f"),
           ("mfu", "MFU", ".3f"), ("peak_gib", "peak GiB", ".1f"), ("first_s", "first s", ".1f"),
           ("error", "error", ".60s")]


def positions_of(lengths: list[int]) -> torch.Tensor:
    """[1, T] positions restarting at 0 at every document."""
    return torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)


def first_call_s(step) -> float:
    """Seconds of one call (the first, which compiles and autotunes)."""
    import time

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def timed(step, steps: int) -> tuple[float, float]:
    """(median ms per step, peak GiB over the timed steps)."""
    torch.cuda.reset_peak_memory_stats()
    ms = cuda_ms(step, warmup=2, repeat=steps)
    return ms, torch.cuda.max_memory_allocated() / 2 ** 30


def report(row: dict, tokens: int, flops: float, peak: float | None) -> dict:
    row["tokens_per_s"] = tokens / row["ms"] * 1e3
    row["tflops"] = flops / row["ms"] / 1e9
    if peak:
        row["mfu"] = row["tflops"] * 1e12 / peak
    return row


def train_step(model, opt, ids, pos, hf: bool = False):
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if hf:
                loss = model(input_ids=ids, labels=ids).loss
            else:
                out = model(ids, position_ids=pos, labels=ids)
                loss = out.loss_sum / out.num_tokens + out.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def hf_qwen(cfg):
    """Qwen2ForCausalLM with our config's dims (fp32 weights, bf16 autocast like ours, SDPA)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hc = Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                     num_key_value_heads=cfg.num_kv_heads, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
                     tie_word_embeddings=cfg.tie_word_embeddings, max_position_embeddings=131072)
    return Qwen2ForCausalLM._from_config(hc, attn_implementation="sdpa").cuda()


def bench_models(cfg, seqs, median, steps, recompute, hf, peak, compile_mode="none") -> list[dict]:
    from model import build_model
    from model.flops import step_flops
    from parallel.compile import apply_compile
    from parallel.recompute import apply_recompute

    rows = []
    systems = [("this project", None)] + ([("hugging face", hf_qwen)] if hf else [])
    for name, make in systems:
        model = make(cfg) if make else build_model(cfg, device="cuda")
        if not make:
            apply_compile(model, compile_mode)
            apply_recompute(model.layers, recompute)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        for t in seqs:
            lengths = document_lengths(t, median) if median and not make else [t]
            row = {"mode": "model", "system": name + ("" if make or compile_mode == "none" else f", compile {compile_mode}"),
                   "tokens": t,
                   "docs": f"{len(lengths)} (median {median})" if len(lengths) > 1 else "1"}
            ids = torch.randint(0, cfg.vocab_size, (1, t), device="cuda")
            pos = positions_of(lengths).cuda()
            try:
                step = train_step(model, opt, ids, pos, hf=bool(make))
                row["first_s"] = first_call_s(step)
                ms_peak = timed(step, steps)
                row["ms"], row["peak_gib"] = ms_peak
                report(row, t, step_flops(cfg, lengths), peak)
                row["first_s"] -= row["ms"] / 1e3
            except torch.OutOfMemoryError as e:
                row["error"] = f"out of memory: {str(e).splitlines()[0]}"
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            rows.append(row)
            print_table([row], COLUMNS)
        del model, opt
        torch.cuda.empty_cache()
    return rows


def bench_layers(cfg, seqs, median, peak) -> list[dict]:
    from model.context import SequenceContext
    from model.decoder import Block, init_part
    from model.flops import block_flops

    rows, seen = [], set()
    for i, kind in enumerate(zip(cfg.mixers, cfg.ffns)):
        if kind in seen:
            continue
        seen.add(kind)
        with torch.device("meta"):
            block = Block(cfg, i)
        block.to_empty(device="cuda")
        init_part(block, cfg.init_std)
        for t in seqs:
            lengths = document_lengths(t, median) if median else [t]
            ctx = SequenceContext.from_position_ids(positions_of(lengths).cuda())
            x = torch.randn(1, t, cfg.hidden_size, device="cuda", requires_grad=True)

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y, _ = block(x, ctx)
                y.float().sum().backward()
                x.grad = None
                block.zero_grad(set_to_none=True)

            row = {"mode": "layer", "system": "+".join(kind), "tokens": t, "docs": str(len(lengths))}
            try:
                row["ms"], row["peak_gib"] = timed(step, 10)
                report(row, t, block_flops(cfg, i, lengths), peak)
            except torch.OutOfMemoryError as e:
                row["error"] = f"out of memory: {str(e).splitlines()[0]}"
            rows.append(row)
            print_table([row], COLUMNS)
        del block
        torch.cuda.empty_cache()
    return rows


def main(mode: str) -> None:
    ap = argparse.ArgumentParser(prog=f"launch/bench.py {mode}", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", nargs="+", type=int, default=[8192])
    ap.add_argument("--median", type=int, default=0, help="pack documents of this median length (0: one)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--recompute", default="none", choices=["none", "full", "selective"])
    ap.add_argument("--compile", default="none", choices=["none", "regions"], help="train.compile")
    ap.add_argument("--hf", action="store_true", help="also time Hugging Face Qwen2ForCausalLM")
    ap.add_argument("--out")
    args, overrides = ap.parse_known_args()
    require_cuda(mode)
    cfg = load_config(overrides).model
    from train.flops import device_peak_flops
    peak = device_peak_flops(torch.device("cuda"))
    if mode == "model":
        rows = bench_models(cfg, args.seq, args.median, args.steps, args.recompute, args.hf, peak, args.compile)
    else:
        rows = bench_layers(cfg, args.seq, args.median, peak)
    print()
    print_table(rows, COLUMNS)
    write_json(args.out, mode, {**vars(args), "overrides": overrides}, rows)


if __name__ == "__main__":
    main(sys.argv.pop(1) if len(sys.argv) > 1 and sys.argv[1] in ("model", "layer") else "model")
