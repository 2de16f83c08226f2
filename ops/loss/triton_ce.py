"""Triton cross-entropy of a chunk's logits that leaves their gradient in place: `logit_grad_`.

Per row of the logits x [C, V] with target t: loss = lse(x) - x[t] in fp32 (0 where t is the
ignore index), and x is overwritten with d loss / d x = softmax(x) - onehot(t) (zeros where t is
ignored), computed in fp32 and rounded once to x's dtype: what `ops.loss` gets from an fp32
log-softmax, its exp and the rounding, without an fp32 [C, V] buffer. One program per row, two
passes over the row in blocks of BLOCK columns: an online max and sum of exponentials, then the
write. Works on CUDA, and on CPU tensors when TRITON_INTERPRET=1 is set before triton is imported.
"""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_BLOCK = 8192  # columns a program holds at once; 8 a thread at 32 warps (sm_90: 31 registers,
#                   two programs an SM, no spills), not timed against other settings yet


@triton.jit
def logit_grad_kernel(x, y, loss, stride, ignore_index, V: tl.constexpr, BLOCK: tl.constexpr):
    """Program r: row r of x [C, V] (rows `stride` apart, columns contiguous) and its target y[r]
    -> loss[r] (fp32), the row's gradient written over it; grid (C,). A target outside [0, V) that is not
    the ignore index gives a NaN loss."""
    row = tl.program_id(0).to(tl.int64)
    x += row * stride
    t = tl.load(y + row)
    cols = tl.arange(0, BLOCK)
    if t == ignore_index:
        for start in range(0, V, BLOCK):
            tl.store(x + start + cols, tl.zeros([BLOCK], dtype=x.dtype.element_ty), mask=start + cols < V)
        tl.store(loss + row, 0.0)
    else:
        # online log-sum-exp; a finite start keeps exp(m - m_new) a number even for -inf logits
        m = -3.0e38
        s = 0.0
        for start in range(0, V, BLOCK):
            xv = tl.load(x + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(xv, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(xv - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        hit = (t >= 0) & (t < V)
        xt = tl.load(x + tl.where(hit, t, 0)).to(tl.float32)  # read before the row is overwritten
        tl.store(loss + row, tl.where(hit, lse - xt, float("nan")))
        for start in range(0, V, BLOCK):
            live = start + cols < V
            xv = tl.load(x + start + cols, mask=live, other=0.0).to(tl.float32)
            g = tl.exp(xv - lse)
            g = tl.where(start + cols == t, g - 1.0, g)
            tl.store(x + start + cols, g.to(x.dtype.element_ty), mask=live)


def logit_grad_(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                block: int | None = None) -> torch.Tensor:
    """logits [C, V] (fp32, bf16 or fp16, columns contiguous), targets [C] int64 -> summed loss
    over the targets that are not `ignore_index` (fp32 0-dim); the logits now hold the gradient
    of that sum. block: columns per step (a power of two), default min(MAX_BLOCK, V rounded up).
    On the meta device (the memory planner replays a CUDA step there) the buffers alone are the
    point: nothing runs and the logits stay as they are."""
    if logits.dim() != 2 or logits.stride(1) != 1 or logits.dtype not in DTYPES:
        raise ValueError(f"logit_grad_: need logits [C, V] in {DTYPES} with contiguous columns, got "
                         f"{logits.dtype} {tuple(logits.shape)} strides {logits.stride()}")
    if targets.shape != logits.shape[:1] or targets.dtype != torch.int64 or targets.device != logits.device:
        raise ValueError(f"logit_grad_: targets must be int64 [{logits.shape[0]}] on {logits.device}, got "
                         f"{targets.dtype} {tuple(targets.shape)} on {targets.device}")
    C, V = logits.shape
    losses = torch.empty(C, dtype=torch.float32, device=logits.device)
    if C and V and logits.device.type != "meta":
        block = block or min(MAX_BLOCK, triton.next_power_of_2(V))
        logit_grad_kernel[(C,)](logits, targets.contiguous(), losses, logits.stride(0), ignore_index,
                                V=V, BLOCK=block, num_warps=max(4, min(32, block // 256)))
    return losses.sum()
