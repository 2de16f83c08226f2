"""Memory planner: the bytes one training step holds on each rank, counted without allocating.

State is counted from the parameter shapes as the engine (parallel/engine.py, FSDP2) lays it out:
every parameter sharded along dim 0 over the dp ranks, ceil(rows / dp) rows per rank (padded).
Activations are measured (`parallel/plan_trace.py`): each distinct block type, and the embedding
+ head + loss, runs forward and backward once on the meta device at the real shape, with the
engine's own recomputation wrapping and, for CUDA, autocast's casts and the fused attention
kernels replayed on meta tensors.
docs/PLANNER.md lists the rules and how each was checked.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from model import build_model
from .plan_trace import LiveBytes, Piece, Setup, balance, trace
from .recompute import MODES

__all__ = ["GiB", "LiveBytes", "MemoryPlan", "balance", "check_fits", "format_plan", "plan_memory", "smallest_dp"]

GiB = 2 ** 30


_MODELS: dict = {}
_PIECES: dict = {}


def _meta_model(cfg, dtype: torch.dtype) -> nn.Module:
    """The model on the meta device in `dtype`, MoE layers with the balanced dispatcher (cached)."""
    key = (repr(cfg), dtype)
    if key not in _MODELS:
        model = build_model(cfg, device="meta").to(dtype)
        balance(model)
        _MODELS[key] = model
    return _MODELS[key]


def _pieces(cfg, setup: Setup, b: int, t: int, recompute: str) -> list[Piece]:
    """One Piece per layer (traced once per block type, cached), then the embedding + head + loss."""
    model, kinds = _meta_model(cfg, setup.weights), list(zip(cfg.mixers, cfg.ffns))
    out = []
    for i, kind in enumerate(kinds + [None]):
        key = (repr(cfg), setup, b, t, kind, recompute if kind else None)
        if key not in _PIECES:
            _PIECES[key] = trace(model, setup, b, t, i if kind else None, recompute)
        out.append(_PIECES[key])
    return out


def _timeline(layers: list[Piece], head: Piece, r: int) -> tuple[int, int]:
    """(bytes the blocks hold for backward at the end of the forward, most bytes alive at any
    moment of the step); r: bytes of one residual [B, T, hidden].

    The forward runs the blocks, then the head; the backward the head, then the blocks in
    reverse, block i's backward seeing what the blocks below it hold. A residual between two
    blocks is kept if the block after keeps its input or the block before its output. The rope
    tables, made once per step, live through it (held by the sequence context or saved)."""
    rope = max(p.rope for p in layers)
    held, prev_out, below, moments = rope, False, [], []
    for p in layers:
        moments.append(held + p.fwd_peak)
        below.append((held, prev_out))
        held += p.kept + r * (p.keeps_input or prev_out)
        prev_out = p.keeps_output
    moments += [held + head.fwd_peak, held + head.bwd_peak + r * (prev_out and not head.keeps_input)]
    for p, (held_below, kept_before) in zip(layers, below):
        moments.append(held_below + p.bwd_peak + r * (kept_before and not p.keeps_input))
    return held + r * prev_out, max(moments)


@dataclass
class MemoryPlan:
    """Bytes per rank of one optimizer step (all ranks alike: only data parallelism varies).

    peaks[s] = params + grads + optimizer + gathered_weights + activations[s] + logits + transient[s]
    for each train.recompute setting s; peak is that of the configured one. transient is what
    the step's worst moment adds: a block's recomputed activations, gradients and temporaries.
    """
    model: str
    dp: int
    zero_stage: int
    sharded: bool                # FSDP2 manages the weights (dp > 1); one rank trains a plain model
    offload: bool
    recompute: str
    micro_batch: int
    seq_len: int
    tokens_per_micro_batch: int
    compute_dtype: str
    params: int                  # fp32 master weights
    grads: int                   # fp32 gradients, with the unsharded ones being accumulated or reduced
    optimizer: int               # AdamW moments, fp32
    gathered_weights: int        # compute-dtype copies of the weights for forward and backward
    host: int                    # master weights, gradients and AdamW state in host memory (offload)
    activations: dict[str, int]  # held for backward at the end of the forward, per recompute setting
    logits: int                  # head + loss at their worst: logits [B, T, V], fp32 copy, log-probs, grads
    transient: dict[str, int]
    peaks: dict[str, int]
    peak: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _state(model: nn.Module, stage: int, dp: int, offload: bool, c: int) -> tuple[int, ...]:
    """(params, grads, optimizer, gathered weights, host) bytes per rank; c: bytes per element of
    the compute dtype. FSDP2 units: the embeddings (unless tied), each block, and the root (final
    norm, LM head), which stays gathered for the whole step."""
    total = sum(p.numel() for p in model.parameters())
    if dp == 1:  # no engine: fp32 weights, gradients and moments; autocast's weight copies
        return 4 * total, 4 * total, 8 * total, (2 * total if c == 2 else 0), 0
    shard = sum(-(-p.shape[0] // dp) * (p.numel() // p.shape[0]) for p in model.parameters())
    units = [sum(p.numel() for p in u.parameters())
             for u in ([] if model.lm_head is None else [model.embeddings]) + list(model.layers)]
    root = total - sum(units)
    largest = max(units + [root])
    # Gradients: the sharded fp32 ones (replicated at stage 0), plus one unit's unsharded gradient
    # in the compute dtype as its backward produces it; stage 1 also accumulates every gradient at
    # full size in fp32 until the step's reduce-scatter, later stages reduce-scatter each unit's
    # gradient from a full-size fp32 copy as soon as its backward ends.
    sharded = 4 * (total if stage == 0 else shard)
    grads = sharded + c * largest + (4 * total if stage == 1 else 4 * largest if stage > 1 else 0)
    # stage 3 frees each unit's weights after use: the one computing and the next, prefetched
    in_flight = max(a + b for a, b in zip(units, units[1:] + [0]))
    gathered = c * (total if stage < 3 else root + in_flight)
    if offload:  # the sharded state lives in host memory; gradients are reduced on the GPU
        return 0, grads - sharded, 0, gathered, 16 * shard
    return sharded, grads, 2 * sharded, gathered, 0


def _settings(cfg, dp: int, device_type: str):
    """Checks what the planner covers; returns (micro-batch, setup, ZeRO stage, state bytes)."""
    par, train = cfg.parallel, cfg.train
    for key in ("pp", "ep", "sp"):
        if getattr(par, key) != 1:
            raise ValueError(f"parallel.{key}={getattr(par, key)}: the planner counts data parallelism only "
                             "(parallel.pp = parallel.ep = parallel.sp = 1)")
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"device type must be cuda or cpu, got {device_type!r}")
    if dp < 1:
        raise ValueError(f"the data-parallel size must be >= 1, got {dp}")
    if par.offload_optimizer and (dp == 1 or device_type != "cuda"):
        raise ValueError("parallel.offload_optimizer=true needs the sharded engine on CUDA (data-parallel "
                         f"size > 1), planned: dp={dp} on {device_type}")
    bf16 = device_type == "cuda" and train.precision != "fp32"
    # one rank: fp32 weights under autocast; the sharded engine computes with bf16 copies of them
    setup = Setup(torch.bfloat16 if bf16 and dp > 1 else torch.float32, torch.bfloat16 if bf16 else None,
                   device_type == "cuda")
    if train.global_batch % dp:
        raise ValueError(f"train.global_batch={train.global_batch} must be divisible by the data-parallel size {dp}")
    local = train.global_batch // dp
    if local % (train.micro_batch or local):
        raise ValueError(f"train.micro_batch={train.micro_batch} must divide the per-rank batch {local} "
                         f"(train.global_batch={train.global_batch} / dp={dp})")
    stage = par.stage_for(dp)
    state = _state(_meta_model(cfg.model, torch.float32), stage, dp, par.offload_optimizer, 2 if bf16 else 4)
    return train.micro_batch or local, setup, stage, state


def plan_memory(cfg, dp: int, device_type: str = "cuda") -> MemoryPlan:
    """cfg: train.config.RunConfig; dp: data-parallel size (the world, as pp = ep = sp = 1)."""
    b, setup, stage, state = _settings(cfg, dp, device_type)
    m, t = cfg.model, cfg.data.seq_len
    residual = b * t * m.hidden_size * setup.weights.itemsize
    activations, transient, peaks = {}, {}, {}
    for setting in MODES:
        *layers, head = _pieces(m, setup, b, t, setting)
        logits = max(head.fwd_peak, head.bwd_peak)
        activations[setting], most = _timeline(layers, head, residual)
        transient[setting] = most - activations[setting] - logits
        peaks[setting] = sum(state[:4]) + most
    return MemoryPlan(m.name, dp, stage, dp > 1, cfg.parallel.offload_optimizer, cfg.train.recompute, b, t,
                      b * t, "bf16" if setup.autocast else "fp32", *state, activations, logits, transient,
                      peaks, peaks[cfg.train.recompute])


def smallest_dp(cfg, gpu_bytes: int, max_dp: int = 4096, device_type: str = "cuda") -> int | None:
    """The smallest data-parallel size whose peak fits `gpu_bytes` (None if none up to max_dp).
    Sizes the batch does not split into (train.global_batch, train.micro_batch) are skipped."""
    t = cfg.train
    for dp in range(2 if cfg.parallel.offload_optimizer else 1, max_dp + 1):
        if t.global_batch % dp or (t.micro_batch and (t.global_batch // dp) % t.micro_batch):
            continue
        if sum(_settings(cfg, dp, device_type)[3][:4]) > gpu_bytes:
            continue  # the state alone does not fit: no need to trace activations
        if plan_memory(cfg, dp, device_type).peak <= gpu_bytes:
            return dp
    return None


def check_fits(plan: MemoryPlan, gpu_bytes: int) -> None:
    """Raises ValueError naming the settings that lower the peak, when the plan does not fit."""
    if plan.peak <= gpu_bytes:
        return
    g = lambda n: f"{n / GiB:.1f}"  # noqa: E731
    parts = ", ".join(f"{name} {g(n)}" for name, n in (
        ("parameters", plan.params), ("gradients", plan.grads), ("optimizer", plan.optimizer),
        ("gathered weights", plan.gathered_weights), ("activations", plan.activations[plan.recompute]),
        ("logits", plan.logits), ("transient", plan.transient[plan.recompute])))
    others = ", ".join(f"{s} {g(plan.peaks[s])}" for s in MODES if s != plan.recompute)
    raise ValueError(
        f"{plan.model} does not fit: peak {g(plan.peak)} GiB per rank > {g(gpu_bytes)} GiB of GPU memory ({parts} "
        f"GiB). Lower it with parallel.zero_stage (now {plan.zero_stage}; 3 shards weights, gradients and optimizer "
        f"state over the dp ranks), parallel.dp / more GPUs (now {plan.dp}), train.recompute (now {plan.recompute}; "
        f"peak with {others} GiB), train.micro_batch (now {plan.micro_batch}) or data.seq_len (now {plan.seq_len}): "
        f"activations and logits grow with the {plan.tokens_per_micro_batch:,} tokens of a micro-batch")


def format_plan(plan: MemoryPlan, gpu_bytes: int | None = None) -> str:
    """The plan as a table per rank (GiB, MiB for small plans); with gpu_bytes, what fits."""
    unit, div = ("GiB", GiB) if plan.peak >= GiB else ("MiB", 2 ** 20)
    g = lambda n: f"{n / div:11.2f}"  # noqa: E731
    zero = f"ZeRO stage {plan.zero_stage}" + ("" if plan.sharded else " (one rank: not sharded)")
    rows = [("parameters (fp32 master weights)", plan.params), ("gradients (fp32)", plan.grads),
            ("optimizer state (AdamW, fp32)", plan.optimizer),
            (f"gathered weights ({plan.compute_dtype})", plan.gathered_weights)]
    rows += [("host memory (offloaded state)", plan.host)] if plan.offload else []
    lines = [f"{plan.model}: dp {plan.dp}, {zero}{', optimizer offload' if plan.offload else ''}, micro-batch "
             f"{plan.micro_batch} x {plan.seq_len} = {plan.tokens_per_micro_batch:,} tokens, "
             f"{plan.compute_dtype} compute; {unit} per rank"]
    lines += [f"{name:36}{g(n)}" for name, n in rows]
    lines.append(f"{'train.recompute':36}" + "".join(f"{s:>11}" for s in MODES))
    for name, values in (("activations", plan.activations), ("logits and loss", dict.fromkeys(MODES, plan.logits)),
                         ("backward transient", plan.transient), ("peak", plan.peaks)):
        lines.append(f"{name:36}" + "".join(g(values[s]) for s in MODES))
    if gpu_bytes is not None:
        lines.append(f"{f'fits {gpu_bytes / GiB:g} GiB':36}" + "".join(
            f"{'yes' if plan.peaks[s] <= gpu_bytes else 'no':>11}" for s in MODES))
    return "\n".join(lines)
