"""What the project's Triton kernels share: the interpreter switch, float32-accumulated dots and
autotuning that keeps its choice in triton's disk cache.

Kernels run on CUDA, and on CPU tensors when TRITON_INTERPRET=1 is set before triton is imported
(the tests do that in a subprocess).
"""
import inspect
import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
UPCAST_DOTS = tl.constexpr(INTERPRET)


def autotune(configs: list, key: list[str]):
    """triton.autotune over `configs`, the choice kept in triton's disk cache (where this triton
    can) so later processes skip the search. The interpreter launches the kernel plainly: there
    the caller passes the meta-parameters a config would have set."""
    def wrap(fn):
        if INTERPRET:
            return fn
        extra = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
        return triton.autotune(configs=configs, key=key, **extra)(fn)
    return wrap


def autotuned(settings, key):
    """Autotune over (num_warps, num_stages) pairs alone (the kernel's block sizes fixed)."""
    return autotune([triton.Config({}, num_warps=w, num_stages=s) for w, s in settings], key)


@triton.jit
def mm(a, b, PREC: tl.constexpr):
    """a @ b accumulated in float32. The interpreter multiplies bfloat16 bit patterns as integers,
    so there the operands go through float32 first (exact)."""
    if UPCAST_DOTS:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)
