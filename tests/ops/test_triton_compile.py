"""The project's Triton attention and GLA kernels compile for an sm_90 GPU (H100/H200) on this machine,
without a GPU: the interpreter that runs them on CPU accepts code the compiler refuses (a
non-constexpr global, say), so this catches what would otherwise fail only on the GPU host.
"""
import pytest
import torch

triton = pytest.importorskip("triton")
compiler = pytest.importorskip("triton.compiler")

from ops.attention import triton_attn as ta  # noqa: E402
from ops.gla import triton_bwd as gb  # noqa: E402
from ops.gla import triton_chunk as gc  # noqa: E402
from ops.gla import triton_fwd as gf  # noqa: E402

CONSTS = dict(HQ=28, HKV=4, G=7, D=128, S=128, PREC="tf32", BM=64, BN=64, BS=64, ROWS=256)
POINTERS = {"lse": "*fp32", "delta": "*fp32", "dsk": "*fp32", "dsv": "*fp32", "lo": "*i32", "hi": "*i32"}
# SpikingBrain-7B's GLA: bf16 q/k/v, float32 log-decay, float32 chunk cumsums and state buffers
GLA_CONSTS = dict(HQ=28, HKV=4, G=7, K=128, V=128, BT=gf.BT, BC=gf.BC, GP=8, GPP=16, PREC="tf32",
                  SPAN=gf.SPAN_MAX, BK=64, BV=64, HAS_H0=True, HAS_DHT=True)
GLA_POINTERS = {**{n: "*fp32" for n in ("g", "gc", "ht", "h0", "U", "dht", "dh0", "dg", "sdA")},
                "tab": "*i32", "doc_off": "*i32", "cu": "*i64"}
INTS = ("TT", "sdA_block")


def compile_for_sm90(kernel, consts, pointers=POINTERS):
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction
    fn = kernel if isinstance(kernel, JITFunction) else kernel.fn  # autotuned: wraps the jit function
    names = fn.arg_names
    signature = {n: "constexpr" if n in consts else "i32" if n in INTS else
                 "fp32" if n in ("qk_scale", "scale") else pointers.get(n, "*bf16") for n in names}
    constexprs = {(names.index(n),): v for n, v in consts.items() if n in names}
    src = compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))


@pytest.mark.skipif(ta.INTERPRET, reason="the interpreter replaces the compiler")
@pytest.mark.parametrize("kernel", ["attn_fwd_kernel", "attn_delta_kernel", "attn_dkdv_kernel",
                                    "attn_dq_kernel", "attn_dsink_kernel"])
@pytest.mark.parametrize("sinks", [0, 128])
def test_attention_kernels_compile_for_sm90(kernel, sinks):
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        pytest.skip(f"triton {triton.__version__} cannot target a GPU it does not see")
    if kernel == "attn_dsink_kernel" and not sinks:
        pytest.skip("runs with sinks only")
    compiled = compile_for_sm90(getattr(ta, kernel), {**CONSTS, "S": sinks})
    assert compiled.asm.get("cubin")  # through ptxas: the GPU host would load this


@pytest.mark.skipif(ta.INTERPRET, reason="the interpreter replaces the compiler")
@pytest.mark.parametrize("kernel", ["fwd.cumsum_kernel", "fwd.fwd_state_kernel", "fwd.fwd_o_kernel",
                                    "bwd.local_dstate_kernel", "bwd.bwd_state_kernel", "bwd.dv_kernel",
                                    "bwd.dqkg_kernel"])
def test_gla_kernels_compile_for_sm90(kernel):
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        pytest.skip(f"triton {triton.__version__} cannot target a GPU it does not see")
    module, name = kernel.split(".")
    fn = getattr(gf if module == "fwd" else gb, name)
    # the blocks the host passes (ops.gla.triton_chunk): state walks, forward and backward chunks
    blocks = gc._state_blocks(128, 128) if "state" in name else dict(BK=gc.FWD_BK) if "fwd_o" in name else {}
    compiled = compile_for_sm90(fn, {**GLA_CONSTS, **blocks}, GLA_POINTERS)
    assert compiled.asm.get("cubin")
