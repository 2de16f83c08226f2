"""Op speed on CUDA, every implementation side by side in one run.

    python launch/bench.py op --ops gla attention loss moe --out op.json
    python launch/bench.py op --ops gla --gla-shapes 4x8192 1x32768 --gla-backends triton fla reference

- gla: `ops.gla.chunk_gla` fwd+bwd at SpikingBrain-7B head shapes (28 query / 4 KV heads, K = V =
  128, bf16 q/k/v, fp32 log-decay as the model makes it): the project's Triton kernel, fla-core's
  `chunk_gla` with k/v/g expanded per query head (the peer), the reference on request;
  dense batches and packed documents.
- attention: `ops.attention.attention` fwd+bwd, GQA 28/4, head dim 128, bf16: sliding window 4096,
  full causal and the 76B sink variant (128 sinks), packed documents, for each backend.
- moe: `ops.moe.grouped_swiglu` fwd+bwd at SpikingBrain-76B expert shapes (16 experts, hidden
  3584, expert size 18944, top-1 routing with uneven loads, fp32 weights under bf16 autocast):
  the grouped GEMMs (`torch._grouped_mm`, the CUDA path) against the per-expert loop (the peer).
- loss: `ops.loss.linear_cross_entropy` against the plain linear + fp32 cross-entropy (the peer)
  and liger-kernel's fused linear cross-entropy (sum reduction), hidden 3584, vocabulary 152064.

Columns: median ms (fwd+bwd), useful TFLOP/s (`model.flops` conventions: forward + backward = 3x
forward, only visible query/key pairs), peak GiB above the inputs. A failing backend prints its
error and the run goes on.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_util import (cu_seqlens_of, cuda_ms, document_lengths, peak_gib, print_table,  # noqa: E402
                        require_cuda, write_json)

HQ, HKV, D = 28, 4, 128
COLUMNS = [("op", "op", "s"), ("case", "case", "s"), ("backend", "backend", "s"), ("ms", "ms", ".2f"),
           ("tflops", "TFLOP/s", ".0f"), ("vs_peer", "x peer", ".2f"), ("peak_gib", "peak GiB", ".2f"),
           ("error", "error", ".60s")]


def parse_shape(text: str) -> tuple[int, int]:
    b, t = text.lower().split("x")
    return int(b), int(t)


def fwd_bwd(fn, leaves):
    """A closure running fn(*leaves) and a backward of its (first) output."""
    def step():
        out = fn(*leaves)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))
        for x in leaves:
            x.grad = None
    return step


def measure(op: str, case: str, backend: str, step, flops: float) -> dict:
    row = {"op": op, "case": case, "backend": backend}
    try:
        row["ms"] = cuda_ms(step)
        row["tflops"] = flops / row["ms"] / 1e9
        row["peak_gib"] = peak_gib(step)
    except Exception as e:  # a backend that does not apply (missing library, shape) is reported
        row["error"] = f"{type(e).__name__}: {e}".replace("\n", " ")
        torch.cuda.empty_cache()
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return row


def add_speedup(rows: list[dict], peer: str) -> None:
    """x peer = the peer's ms / this row's ms, within each (op, case)."""
    for row in rows:
        ref = next((r for r in rows if r["op"] == row["op"] and r["case"] == row["case"]
                    and r["backend"] == peer and "ms" in r), None)
        if ref and "ms" in row:
            row["vs_peer"] = ref["ms"] / row["ms"]


# -- GLA -----------------------------------------------------------------------------------------
def gla_flops(lengths: list[int], chunk: int = 64) -> float:
    """Forward+backward FLOPs of GLA over documents (model.flops' convention)."""
    from model.flops import gla_flops as count
    return count(lengths, HQ, HKV, D, D, chunk=chunk)


def bench_gla(shapes, median, backends) -> list[dict]:
    from ops.gla import chunk_gla

    rows = []
    cases = []
    for b, t in shapes:
        cases.append((f"{b}x{t}", b, t, None))
        cases.append((f"{b * t} packed (median {median})", 1, b * t, document_lengths(b * t, median)))
    for name, b, t, lengths in cases:
        gen = torch.Generator(device="cuda").manual_seed(0)
        r = lambda *s: torch.randn(*s, device="cuda", generator=gen)
        q = F.relu(r(b, t, HQ, D)).bfloat16().requires_grad_()
        k = F.relu(r(b, t, HKV, D)).bfloat16().requires_grad_()
        v = r(b, t, HKV, D).bfloat16().requires_grad_()
        g = (F.logsigmoid(r(b, t, HKV, D)) / 16).requires_grad_()
        cu = cu_seqlens_of(lengths, "cuda") if lengths else None
        flops = gla_flops(lengths or [t] * b)
        for backend in backends:
            fn = lambda q, k, v, g, backend=backend: chunk_gla(q, k, v, g, cu_seqlens=cu, backend=backend)
            rows.append(measure("gla", name, backend, fwd_bwd(fn, [q, k, v, g]), flops))
        del q, k, v, g
        torch.cuda.empty_cache()
    add_speedup(rows, "fla")
    return rows


# -- attention -----------------------------------------------------------------------------------
def bench_attention(lengths_list, window: int, sinks: int, backends) -> list[dict]:
    from model.flops import attention_pairs
    from ops.attention import attention

    rows = []
    for t, median in lengths_list:
        lengths = document_lengths(t, median) if median else [t]
        cu = cu_seqlens_of(lengths, "cuda") if median else None
        gen = torch.Generator(device="cuda").manual_seed(0)
        r = lambda *s: torch.randn(*s, device="cuda", generator=gen, dtype=torch.bfloat16)
        q, k, v = (r(1, t, h, D).requires_grad_() for h in (HQ, HKV, HKV))
        sk, sv = (r(sinks, HKV, D).requires_grad_() for _ in range(2)) if sinks else (None, None)
        docs = f"median {median}" if median else "1 doc"
        for label, w, s in ((f"swa {window}", window, 0), ("full", None, 0), (f"swa {window} + {sinks} sinks", window, sinks)):
            if s and not sinks:
                continue
            pairs = attention_pairs(lengths, w, s)
            flops = 3 * 4 * D * HQ * pairs
            leaves = [q, k, v] + ([sk, sv] if s else [])
            for backend in backends:
                if backend == "sdpa" and t > 32768:
                    continue  # its dense [T, T] mask alone exceeds the GPU
                fn = lambda q, k, v, *sink, w=w, backend=backend: attention(
                    q, k, v, window=w, sink_k=sink[0] if sink else None, sink_v=sink[1] if sink else None,
                    cu_seqlens=cu, backend=backend)
                rows.append(measure("attention", f"{t} {docs} {label}", backend, fwd_bwd(fn, leaves), flops))
        del q, k, v, sk, sv
        torch.cuda.empty_cache()
    add_speedup(rows, "sdpa")
    return rows


# -- moe -------------------------------------------------------------------------------------------
def bench_moe(tokens_list, experts: int, hidden: int, size: int) -> list[dict]:
    from ops.moe import grouped_swiglu_grouped_mm, grouped_swiglu_reference

    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = [(torch.randn(experts, *shape, device="cuda", generator=gen) * 0.02).requires_grad_()
               for shape in ((size, hidden), (size, hidden), (hidden, size))]
    for n in tokens_list:
        # uneven loads, as a router early in training gives them: expert e's share ~ 1 / (e + 1)
        share = 1.0 / torch.arange(1, experts + 1, device="cuda")
        idx = torch.multinomial(share / share.sum(), n, replacement=True, generator=gen)
        counts = torch.bincount(idx, minlength=experts)
        x = torch.randn(n, hidden, device="cuda", generator=gen).requires_grad_()
        flops = 3 * 3 * 2 * n * hidden * size
        for backend, fn in (("grouped_mm", grouped_swiglu_grouped_mm), ("loop", grouped_swiglu_reference)):
            def run(x, *w, fn=fn):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return fn(x, counts, *w)
            rows.append(measure("moe", f"{n} tokens, {experts} experts, max load {int(counts.max())}",
                                backend, fwd_bwd(run, [x, *weights]), flops))
    add_speedup(rows, "loop")
    return rows


# -- loss ------------------------------------------------------------------------------------------
def bench_loss(tokens_list, hidden: int, vocab: int) -> list[dict]:
    from ops.loss import linear_cross_entropy

    rows = []
    for n in tokens_list:
        gen = torch.Generator(device="cuda").manual_seed(0)
        h = (torch.randn(n, hidden, device="cuda", generator=gen) * 0.5).requires_grad_()
        w = (torch.randn(vocab, hidden, device="cuda", generator=gen) * 0.02).requires_grad_()
        y = torch.randint(0, vocab, (n,), device="cuda", generator=gen)
        flops = 3 * 2 * n * hidden * vocab

        def fused(h, w):
            with torch.autocast("cuda", torch.bfloat16):
                return linear_cross_entropy(h, w, y)

        def plain(h, w):
            with torch.autocast("cuda", torch.bfloat16):
                logits = F.linear(h, w)
            return F.cross_entropy(logits.float(), y, reduction="sum")

        def liger(h, w):  # imported here: without liger-kernel the row reports the ImportError
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
            with torch.autocast("cuda", torch.bfloat16):
                out = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="sum")(w, h, y)
            return out[0] if isinstance(out, tuple) else getattr(out, "loss", out)

        for backend, fn in (("chunked", fused), ("plain", plain), ("liger", liger)):
            rows.append(measure("loss", f"{n} x {vocab}", backend, fwd_bwd(fn, [h, w]), flops))
        del h, w
        torch.cuda.empty_cache()
    add_speedup(rows, "plain")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", nargs="+", default=["gla", "attention", "loss", "moe"],
                    choices=["gla", "attention", "loss", "moe"])
    ap.add_argument("--gla-shapes", nargs="+", type=parse_shape, default=[(4, 8192), (1, 32768)],
                    help="BxT (default 4x8192 1x32768)")
    ap.add_argument("--median", type=int, default=1024, help="median document length of packed cases")
    ap.add_argument("--gla-backends", nargs="+", default=["triton", "fla"], choices=["triton", "fla", "reference"],
                    help="fla-core autotunes for minutes on its first call: time it in its own run if needed")
    ap.add_argument("--attn-backends", nargs="+", default=["triton", "flex", "varlen", "sdpa"],
                    choices=["triton", "flex", "varlen", "sdpa", "reference"])
    ap.add_argument("--attn-lengths", nargs="+", type=int, default=[8192, 32768])
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--sinks", type=int, default=128)
    ap.add_argument("--loss-tokens", nargs="+", type=int, default=[8192, 32768])
    ap.add_argument("--moe-tokens", nargs="+", type=int, default=[8192, 32768])
    ap.add_argument("--out")
    args = ap.parse_args()
    require_cuda("op")
    rows = []
    if "gla" in args.ops:
        rows += bench_gla(args.gla_shapes, args.median, args.gla_backends)
    if "attention" in args.ops:
        cases = [(t, m) for t in args.attn_lengths for m in (0, args.median)]
        rows += bench_attention(cases, args.window, args.sinks, args.attn_backends)
    if "loss" in args.ops:
        rows += bench_loss(args.loss_tokens, 3584, 152064)
    if "moe" in args.ops:
        rows += bench_moe(args.moe_tokens, 16, 3584, 18944)
    print_table(rows, COLUMNS)
    write_json(args.out, "op", vars(args), rows)


if __name__ == "__main__":
    main()
