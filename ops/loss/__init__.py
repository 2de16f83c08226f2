"""Linear + cross-entropy over a large vocabulary without the full logits: `linear_cross_entropy`.

The plain LM-head loss (`reference.linear_cross_entropy_reference`) holds the [N, V] logits in
the compute dtype, their fp32 copy and the gradient of both: at N = 32k tokens and the 152k
vocabulary the fp32 logits alone are 20 GB. Here the tokens go through in chunks. A chunk's
logits live only while its loss and its gradient pieces are computed, all in the forward
(softmax - onehot, then the chunk's rows of d h and its share of d W, accumulated in fp32). The
loss is a sum, so its gradient is linear in grad_output: the backward only scales what the
forward kept. No weight is saved for the backward.

On CUDA (fp32, bf16, fp16; on meta inside `meta_as_cuda`, where the memory planner replays a
CUDA step, the same buffers without launches) a chunk's logits go through a Triton kernel
(`triton_ce`) in two passes, an online log-sum-exp and the write of softmax - onehot over the
logits themselves, and its share of d W is added by one addmm with an fp32 output (16-bit
inputs, where this torch has that overload). Elsewhere, and without triton, the chunk is
PyTorch: an fp32 log-softmax, its exp in place, the rounding to the compute dtype, and each
chunk's [V, D] product made and then added.
Memory beyond the inputs: one chunk's logits in the compute dtype (plus, off CUDA, an fp32
log-softmax buffer of the same shape), d h [N, D] in h's dtype and d W [V, D] in fp32 (each only
when that input needs a gradient), and while the forward runs the weight in the compute dtype
(when it differs) and, off the addmm path, one chunk's [V, D] share of d W.

Numerics follow the plain path on both: logits in the compute dtype (autocast's when autocast is
on for the device, else the inputs'), read in fp32 for an fp32 log-sum-exp, the fp32 logit
gradient rounded once to the compute dtype before its two matmuls (as autograd does through
`.float()`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ops import meta_as_cuda, takes_cuda_path

from .reference import linear_cross_entropy_reference

try:
    from . import triton_ce
except ImportError:  # no triton on this machine: every device takes the PyTorch chunk
    triton_ce = None

__all__ = ["default_chunk_tokens", "linear_cross_entropy", "linear_cross_entropy_reference", "meta_as_cuda"]

CHUNK_LOGIT_BYTES = 2 ** 30  # a chunk's fp32 logits by default (1664 tokens at V = 152064)
_NO_ADDMM_FP32_OUT: set[str] = set()  # device types where addmm(out_dtype=float32) was refused


def default_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk whose fp32 logits [chunk, vocab_size] fit in CHUNK_LOGIT_BYTES, rounded
    down to a multiple of 128 (matmul-friendly), at least 128."""
    return max(128, CHUNK_LOGIT_BYTES // (4 * vocab_size) // 128 * 128)


def _compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype of the logits: autocast's when it is on for h's device, else the inputs' (the
    wider of the two where they differ)."""
    device = h.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(h.dtype, weight.dtype)


_as_cuda = takes_cuda_path  # on CUDA, or on meta inside `meta_as_cuda` (the fused logit gradient
#                             allocating its buffers, launching nothing; the fp32-output addmm)


def _fused(t: torch.Tensor) -> bool:
    """Whether a chunk whose inputs are like t makes its [C, V] work the Triton logit gradient:
    on the CUDA path (and on CPU tensors under the Triton interpreter), for its dtypes."""
    if triton_ce is None or t.dtype not in triton_ce.DTYPES:
        return False
    return _as_cuda(t) or (t.device.type == "cpu" and triton_ce.INTERPRET)




def _add_head_grad(grad_w: torch.Tensor, grad: torch.Tensor, x: torch.Tensor) -> None:
    """grad_w [V, D] (fp32) += grad^T @ x, grad [C, V] and x [C, D] in the compute dtype. On the
    CUDA path with 16-bit inputs one addmm with an fp32 output accumulates in place; elsewhere
    (or where this torch lacks that overload) each chunk's [V, D] product is made in the compute
    dtype and added."""
    kind = grad.device.type
    if grad.dtype in (torch.bfloat16, torch.float16) and _as_cuda(grad) and kind not in _NO_ADDMM_FP32_OUT:
        try:
            torch.addmm(grad_w, grad.t(), x.to(grad.dtype), out_dtype=torch.float32, out=grad_w)
            return
        except torch.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError):  # no out_dtype overload (or not for this device): as below
            _NO_ADDMM_FP32_OUT.add(kind)
    grad_w += grad.t() @ x


def _chunk(hc, w, y, ignore_index: int, grad_h, grad_w) -> torch.Tensor:
    """One chunk: hc [C, D] and w [V, D] in the compute dtype, y [C] -> its summed loss (fp32
    0-dim). Writes d loss / d hc into grad_h [C, D] and adds d loss / d w into grad_w [V, D]
    (fp32) where they are given. Its [C, V] temporaries are freed when it returns.

    Where `_fused` says so, the [C, V] work after the matmul is the Triton kernel
    (`triton_ce.logit_grad_`): two passes over the logits, which it overwrites with their
    gradient (ignored rows zero); no fp32 [C, V] buffer. Elsewhere it is three passes: the fp32
    log-softmax read straight from the compute-dtype logits, its exp in place (softmax), the
    rounding to the compute dtype; ignored rows are zeroed on the [C, D] side (their rows of
    d hc, and of hc for d w) instead of on [C, V]."""
    if _fused(hc):
        logits = F.linear(hc, w)  # [C, V]
        loss = triton_ce.logit_grad_(logits, y, ignore_index)
        if grad_h is None and grad_w is None:
            return loss
        grad, keep = logits, None  # softmax - onehot in the compute dtype, ignored rows 0
        del logits
    else:
        valid = y != ignore_index  # [C]
        safe = torch.where(valid, y, 0).unsqueeze(1)  # gather-safe [C, 1]
        logp = torch.log_softmax(F.linear(hc, w), dim=1, dtype=torch.float32)  # [C, V]
        loss = -(logp.gather(1, safe).squeeze(1) * valid).sum()
        if grad_h is None and grad_w is None:
            return loss
        # softmax - onehot, rounded to the compute dtype (as autograd does through `.float()`)
        grad = logp.exp_().scatter_add_(1, safe, torch.full_like(safe, -1.0, dtype=logp.dtype)).to(hc.dtype)
        del logp  # the fp32 buffer goes before the two matmuls
        keep = valid.unsqueeze(1).to(hc.dtype)
    if grad_h is not None:
        grad_h.copy_(grad @ w if keep is None else (grad @ w) * keep)
    if grad_w is not None:
        _add_head_grad(grad_w, grad, hc if keep is None else hc * keep)
    return loss


def _chunked(h, weight, targets, ignore_index: int, chunk_tokens: int, dtype: torch.dtype,
             want_h: bool, want_w: bool):
    """h [N, D], weight [V, D], targets [N] -> (loss_sum fp32 0-dim, d loss_sum / d h [N, D] in h's
    dtype or None, d loss_sum / d weight [V, D] fp32 or None)."""
    # Views of an input inside an autograd.Function still require grad, so the planner's autocast
    # emulation (parallel/plan_trace.py) would cache their casts as weight copies; the gradients
    # here are made by hand, so h is detached.
    h, n = h.detach(), h.shape[0]
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if want_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
    # Every matmul gets both inputs in `dtype`, so autocast, when on, changes nothing here.
    w = weight.to(dtype)
    for start in range(0, n, chunk_tokens):
        end = min(start + chunk_tokens, n)
        loss += _chunk(h[start:end].to(dtype), w, targets[start:end], ignore_index,
                       grad_h[start:end] if want_h else None, grad_w)
    return loss, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, chunk_tokens, dtype):
        want_h, want_w = ctx.needs_input_grad[:2]
        loss, grad_h, grad_w = _chunked(h, weight, targets, ignore_index, chunk_tokens, dtype,
                                        want_h, want_w)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        # Scaled in place: the pieces serve one backward (a second one through a retained graph
        # fails on their version counter instead of reusing scaled values).
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_out)
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_out).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         ignore_index: int = -100, chunk_tokens: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of the logits h @ weight^T, never holding more than a chunk of them.

    h [N, D]; weight [V, D] (an LM head's, or the tied embedding: its gradient adds to the
    embedding's); targets [N] int64, `ignore_index` where no loss is taken. Returns loss_sum, fp32
    0-dim: the sum over the other targets (0, with zero gradients, when all are ignored); its
    gradients equal those of `linear_cross_entropy_reference` up to the rounding of the compute
    dtype. chunk_tokens: tokens per chunk, default `default_chunk_tokens(V)` (fp32 logits of a
    chunk within 1 GiB). Runs on every device; no graph and no gradient pieces without grad mode
    or without an input that requires grad.
    """
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: need h [N, D] and weight [V, D], got "
                         f"{tuple(h.shape)} and {tuple(weight.shape)}")
    if targets.shape != h.shape[:1] or targets.dtype != torch.int64:
        raise ValueError(f"linear_cross_entropy: targets must be int64 [{h.shape[0]}], got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    chunk = default_chunk_tokens(weight.shape[0]) if chunk_tokens is None else chunk_tokens
    if chunk < 1:
        raise ValueError(f"linear_cross_entropy: chunk_tokens must be >= 1, got {chunk_tokens}")
    dtype = _compute_dtype(h, weight)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, targets, ignore_index, chunk, dtype)
    return _chunked(h, weight, targets, ignore_index, chunk, dtype, False, False)[0]
