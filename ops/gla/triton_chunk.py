"""Host side of the Triton chunked GLA: chunk tables, launches, the autograd.Function, `supports`.

Same semantics as `ops.gla.reference.chunk_gla_reference`; the chunk size is fixed at 64 (the
reference's chunk_size argument only trades speed for memory and is not used here). Works on
CUDA, and on CPU tensors when TRITON_INTERPRET=1 is set before triton is imported. Nothing here
reads device values on the host: the chunk tables are built on the device with an upper bound of
T // 64 + N chunks, and the kernels skip the chunks past the real count.
"""
import torch
import triton

from . import triton_bwd as bwd
from . import triton_fwd as fwd
from .reference import _check_inputs

BT, BC = fwd.BT, fwd.BC
DTYPES = (torch.float32, torch.bfloat16)
HEAD_DIMS = (16, 32, 64, 128)
MAX_GROUP = 16  # groups above 8 at K = V = 128 spill registers (still correct)
# Tests set this: every buffer the kernels write starts as NaN, so an element they miss shows up.
NAN_FILL = False


def _new(shape, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if NAN_FILL:
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)
    return torch.empty(shape, device=like.device, dtype=dtype)


def _launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args). On the meta device (the memory planner replays a CUDA step there) the
    buffers alone are the point, and nothing runs."""
    if args[0].device.type != "meta":
        kernel[grid](*args, **kwargs)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
             initial_state: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None) -> bool:
    """Whether `chunk_gla_triton` runs these inputs (device, dtypes, head sizes, group size,
    grid limits). cu_seqlens may also sit on the CPU (it is copied over, which needs no sync)."""
    on_device = q.device.type == "cpu" if fwd.INTERPRET else q.is_cuda
    if not on_device or any(x is not None and x.device != q.device for x in (k, v, g, initial_state)):
        return False
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False
    B, T, Hq, K = q.shape
    Hkv, V = k.shape[2], v.shape[3]
    N = B if cu_seqlens is None else max(cu_seqlens.numel() - 1, 1)
    return (q.dtype in DTYPES and k.dtype == q.dtype and v.dtype == q.dtype and g.dtype.is_floating_point
            and g.dtype != torch.float64 and K in HEAD_DIMS and V in HEAD_DIMS and Hkv > 0
            and Hq % Hkv == 0 and Hq // Hkv <= MAX_GROUP and B * T > 0
            and B * T // BT + N < 2 ** 16 and N < 2 ** 16)  # grid axes 1 and 2 hold chunks, documents


def check_inputs(q, k, v, g, initial_state, cu_seqlens) -> int:
    """The reference's input checks -> N. On CUDA the boundary values stay unread (reading them
    would stall the host): the shape and dtype checks run on a stand-in 0, ..., 0, T."""
    if cu_seqlens is not None and cu_seqlens.device.type != "cpu":
        stand_in = torch.zeros(cu_seqlens.shape, dtype=cu_seqlens.dtype)
        if stand_in.dim() == 1 and stand_in.numel() >= 2:
            stand_in[-1] = q.shape[1]
        cu_seqlens = stand_in
    return _check_inputs("chunk_gla", q, k, v, g, initial_state, cu_seqlens)


def chunk_tables(cu: torch.Tensor, n_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cu [N+1] int64 document bounds (device) -> tab [n_chunks, 4] int32 (first row, valid rows,
    document, is-last-chunk-of-its-document; chunks past the real count have 0 rows) and
    doc_off [N+1] int32 (first chunk of each document, then the real count)."""
    N = cu.numel() - 1
    counts = (cu[1:] - cu[:-1] + BT - 1) // BT
    doc_off = torch.zeros(N + 1, dtype=torch.int64, device=cu.device)
    doc_off[1:] = torch.cumsum(counts, 0)
    c = torch.arange(n_chunks, device=cu.device)
    doc = torch.searchsorted(doc_off[1:], c, right=True).clamp_(max=N - 1)
    t0 = cu[doc] + (c - doc_off[doc]) * BT
    rows = torch.where(c < doc_off[-1], (cu[doc + 1] - t0).clamp(0, BT), 0)
    last = (c == doc_off[doc + 1] - 1).long()
    return torch.stack([t0, rows, doc, last], 1).to(torch.int32), doc_off.to(torch.int32)


def _meta(q, k, v):
    """Compile-time sizes shared by the chunk kernels."""
    Hq, K, Hkv, V = q.shape[2], q.shape[3], k.shape[2], v.shape[3]
    G = Hq // Hkv
    GP = triton.next_power_of_2(G)
    # float32 inputs: three TF32 products per dot (tensor cores, close to float32 accuracy);
    # plain float32 ("ieee") dots would run on the FMA units and compile for minutes at K = 128.
    return dict(HQ=Hq, HKV=Hkv, G=G, K=K, V=V, BT=BT, BC=BC, GP=GP,
                PREC="tf32x3" if q.dtype == torch.float32 else "tf32", SPAN=float(fwd.SPAN_MAX))


def _state_blocks(K: int, V: int) -> dict:
    # Small blocks: the state passes run one program per (document, KV head, block) in sequence
    # over the chunks, so more blocks mean more of the GPU at work on long documents (K = V = 128:
    # 32 programs per KV head, 128 for one 32k-token document with 4 KV heads).
    return dict(BK=min(K, 16), BV=min(V, 32))


# Channel blocks of the chunk kernels: the query-side tiles are [16 * GP, block] float32 and
# must stay within the registers at GP = 8 (tests set 16 to reach the multi-block code at K = 32).
FWD_BK, BWD_BK, BWD_BV = 32, 64, 64


def _recompute(q, k, v, g, h0, cu, tab, doc_off, m):
    """gc [NC, HKV, BT, K] float32, hs [NC, HKV, K, V] (q's dtype), ht [N, HKV, K, V] float32."""
    NC, N = tab.shape[0], cu.numel() - 1
    Hkv, K, V = m["HKV"], m["K"], m["V"]
    gc = _new((NC, Hkv, BT, K), q, torch.float32)
    _launch(fwd.cumsum_kernel, (NC, Hkv), g, gc, tab, HKV=Hkv, K=K, BT=BT)
    hs = _new((NC, Hkv, K, V), q, q.dtype)
    ht = _new((N, Hkv, K, V), q, torch.float32)
    blocks = _state_blocks(K, V)
    grid = (K // blocks["BK"] * (V // blocks["BV"]), Hkv, N)
    _launch(fwd.fwd_state_kernel, grid, k, v, gc, h0 if h0 is not None else ht, hs, ht, cu, doc_off,
                               HKV=Hkv, K=K, V=V, BT=BT, HAS_H0=h0 is not None, PREC=m["PREC"], **blocks)
    return gc, hs, ht


class ChunkGLAFunction(torch.autograd.Function):
    """(q, k, v, g, h0 or None, cu [N+1] int64, tab, doc_off, scale) -> o, final state."""

    @staticmethod
    def forward(ctx, q, k, v, g, h0, cu, tab, doc_off, scale):
        m = _meta(q, k, v)
        gc, hs, ht = _recompute(q, k, v, g, h0, cu, tab, doc_off, m)
        o = _new(q.shape[:3] + (m["V"],), q, q.dtype)
        scratch = _new(q.shape[:3] + (BC,), q, q.dtype)
        _launch(fwd.fwd_o_kernel, (tab.shape[0], m["HKV"]), q, k, v, g, gc, hs, o, scratch, tab, scale,
                                                     BK=min(m["K"], FWD_BK), GPP=max(16, m["GP"]), **m)
        ctx.save_for_backward(q, k, v, g, h0, cu, tab, doc_off)
        ctx.scale = scale
        ctx.set_materialize_grads(False)  # an unused final state sends no gradient to read
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0, cu, tab, doc_off = ctx.saved_tensors
        scale, m = ctx.scale, _meta(q, k, v)
        NC, N = tab.shape[0], cu.numel() - 1
        Hkv, K, V = m["HKV"], m["K"], m["V"]
        # States are recomputed rather than saved: they would cost as much memory as k and v.
        gc, hs, ht = _recompute(q, k, v, g, h0, cu, tab, doc_off, m)
        do = do.contiguous() if do is not None else torch.zeros(q.shape[:3] + (V,), device=q.device,
                                                                dtype=q.dtype)
        U = _new((NC, Hkv, K, V), q, torch.float32)
        bk, bv, gpp = min(K, BWD_BK), min(V, BWD_BV), max(16, m["GP"])
        _launch(bwd.local_dstate_kernel, (K // bk, NC, Hkv), q, gc, do, U, tab, scale, HQ=m["HQ"], HKV=Hkv,
                                                    G=m["G"], K=K, V=V, BK=bk, BT=BT, BC=BC,
                                                    GP=m["GP"], PREC=m["PREC"])
        dhs = _new((NC, Hkv, K, V), q, q.dtype)
        dh0 = _new((N, Hkv, K, V), q, torch.float32)
        blocks = _state_blocks(K, V)
        grid = (K // blocks["BK"] * (V // blocks["BV"]), Hkv, N)
        _launch(bwd.bwd_state_kernel, grid, gc, U, dht.contiguous() if dht is not None else dh0, dhs, dh0,
                                   doc_off, HKV=Hkv, K=K, V=V, BT=BT, HAS_DHT=dht is not None, **blocks)
        dq, dk, dv, dg = (_new(x.shape, x, x.dtype) for x in (q, k, v, g))
        _launch(bwd.dv_kernel, (V // bv, NC, Hkv), q, k, g, gc, do, dhs, dv, tab, scale, BK=bk, BV=bv,
                                           GPP=gpp, **m)
        scratch = _new((K // bk,) + q.shape[:3] + (BC,), q, torch.float32)
        _launch(bwd.dqkg_kernel, (K // bk, NC, Hkv), q, k, v, g, gc, hs, ht, do, dhs, dq, dk, dg, scratch,
                                            scratch[0].numel(), tab, scale, BK=bk, GPP=gpp, **m)
        dh0 = dh0.to(h0.dtype) if h0 is not None else None
        return dq, dk, dv, dg, dh0, None, None, None, None


def chunk_gla_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *,
                     scale: float | None = None, initial_state: torch.Tensor | None = None,
                     output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked GLA on the Triton kernels (call `supports` first).

    q [B, T, Hq, K], k/g [B, T, Hkv, K], v [B, T, Hkv, V], initial_state [N, Hkv, K, V],
    cu_seqlens [N+1] (B == 1) -> o [B, T, Hq, V] in q's dtype, final_state [N, Hkv, K, V]
    float32 or None. scale defaults to K ** -0.5.
    """
    N = check_inputs(q, k, v, g, initial_state, cu_seqlens)
    B, T, _, K = q.shape
    if cu_seqlens is None:
        cu = torch.arange(0, B * T + 1, T, device=q.device, dtype=torch.int64)
        n_chunks = B * triton.cdiv(T, BT)
    else:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int64)
        n_chunks = T // BT + N
    tab, doc_off = chunk_tables(cu, n_chunks)
    scale = K ** -0.5 if scale is None else float(scale)
    h0 = initial_state.contiguous() if initial_state is not None else None
    o, ht = ChunkGLAFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(),
                                   h0, cu, tab, doc_off, scale)
    return o, (ht if output_final_state else None)
