"""Fused spike quantisation in Triton: one program per row, one launch for threshold, counts,
output and optional count statistics.

Numerics follow `ops.spike.reference` rule for rule (float32 math, IEEE-rounded divisions, round
half to even, one rounding to the output dtype); only the order of the |x| summation differs, so
V_th can differ from the reference in the last bit when the row sum is not exact.
Works on CUDA, and on CPU tensors when TRITON_INTERPRET=1 is set before this module is imported
(triton decides at decoration time).
"""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_BLOCK = 4096


@triton.jit
def _spike_kernel(x_ptr, out_ptr, counts_ptr, vth_ptr, stats_ptr, denom, v_min, v_max,
                  D: tl.constexpr, BLOCK: tl.constexpr, WRITE_COUNTS: tl.constexpr,
                  WRITE_STATS: tl.constexpr, OUT_BF16: tl.constexpr):
    # D is a compile-time constant: one build per hidden size, and triton 3.6's interpreter cannot
    # loop over a runtime integer argument.
    # float32 scalars: torch.compile launches this kernel with Python floats typed as float64,
    # which div_rn (float32 only) refuses; triton's own launcher types them float32 (same values)
    denom, v_min, v_max = tl.cast(denom, tl.float32), tl.cast(v_min, tl.float32), tl.cast(v_max, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < D, other=0.0).to(tl.float32)
        acc += tl.abs(x)
    v_th = tl.math.div_rn(tl.sum(acc, axis=0), denom)
    v_th = tl.minimum(tl.maximum(v_th, v_min), v_max)
    tl.store(vth_ptr + row, v_th)

    zeros = tl.zeros([BLOCK], dtype=tl.int32)
    le7 = tl.zeros([BLOCK], dtype=tl.int32)
    abs_sum = tl.zeros([BLOCK], dtype=tl.int64)
    for start in range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < D
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.math.div_rn(x, v_th)
        # Round half to even with exact steps only (floor, y - floor(y), comparisons), so no
        # compiler or interpreter rounding mode can change it.
        r = tl.floor(y)
        frac = y - r
        r_odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        s = tl.where((frac > 0.5) | ((frac == 0.5) & r_odd), r + 1.0, r)
        q = s * v_th
        if OUT_BF16:
            # Round to nearest even by hand: the interpreter's float32 -> bfloat16 cast truncates.
            bits = q.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            tl.store(out_ptr + row * D + cols, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True),
                     mask=mask)
        else:
            tl.store(out_ptr + row * D + cols, q.to(out_ptr.dtype.element_ty), mask=mask)
        if WRITE_COUNTS:
            tl.store(counts_ptr + row * D + cols, s.to(tl.int32), mask=mask)
        if WRITE_STATS:
            a = tl.abs(s)
            zeros += tl.where(mask & (a == 0.0), 1, 0)
            le7 += tl.where(mask & (a <= 7.0), 1, 0)
            abs_sum += a.to(tl.int64)
    if WRITE_STATS:
        tl.store(stats_ptr + row * 3 + 0, tl.sum(zeros, axis=0).to(tl.int64))
        tl.store(stats_ptr + row * 3 + 1, tl.sum(abs_sum, axis=0))
        tl.store(stats_ptr + row * 3 + 2, tl.sum(le7, axis=0).to(tl.int64))


def supports(x: torch.Tensor) -> bool:
    """Whether `spike_quantize_triton` can run on x (device, dtype, non-empty rows)."""
    on_device = x.device.type == "cpu" if INTERPRET else x.is_cuda
    return on_device and x.dtype in DTYPES and x.dim() >= 1 and x.numel() > 0


def spike_quantize_triton(x: torch.Tensor, k: float, v_min: float, v_max: float, *,
                          want_counts: bool = False, want_stats: bool = False,
                          out: torch.Tensor | None = None):
    """x [..., D] -> out [..., D] (x's dtype), counts [..., D] int32 or None, v_th [..., 1] float32,
    stats int64 [4] (numel, zeros, sum |s|, |s| <= 7) or None.

    `out` (optional, [..., D] contiguous, x's dtype) is written in place; tests pass NaN-filled
    buffers so an element the kernel misses shows up.
    """
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()
    R = x2.shape[0]
    out = torch.empty_like(x2) if out is None else out
    v_th = torch.empty(R, device=x.device, dtype=torch.float32)
    counts = torch.empty((R, D), device=x.device, dtype=torch.int32) if want_counts else v_th
    stats = torch.empty((R, 3), device=x.device, dtype=torch.int64) if want_stats else v_th
    block = min(triton.next_power_of_2(D), MAX_BLOCK)
    _spike_kernel[(R,)](x2, out, counts, v_th, stats, float(D * k), float(v_min), float(v_max),
                        D=D, BLOCK=block, WRITE_COUNTS=want_counts, WRITE_STATS=want_stats,
                        OUT_BF16=x.dtype == torch.bfloat16,
                        num_warps=min(max(block // 256, 1), 16))
    summary = None
    if want_stats:
        summary = torch.cat([torch.full((1,), R * D, device=x.device, dtype=torch.int64), stats.sum(0)])
    return (out.view(x.shape), counts.view(x.shape) if want_counts else None,
            v_th.view(*x.shape[:-1], 1), summary)
