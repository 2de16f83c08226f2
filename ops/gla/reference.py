"""Pure-PyTorch gated linear attention (GLA), the ground truth for the fast kernels.

Per sequence and KV head the state S [K, V] follows
    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,    o_t^h = scale * q_t^h S_t^{kv(h)},
with g <= 0 a per-channel log-decay. Query head h reads KV head h // (Hq // Hkv) (Hugging Face
repeat_kv grouping); the state is kept once per KV head and shared by the query heads of its group
instead of repeating k, v and g.

Both forms compute in float32 (float64 inputs stay float64) and are differentiable through plain
autograd with respect to q, k, v, g and initial_state.
"""
import torch
import torch.nn.functional as F


def _check_inputs(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                  initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None) -> int:
    """Raise ValueError naming the first problem; return N, the number of independent sequences."""
    for arg, x in (("q", q), ("k", k), ("v", v), ("g", g)):
        if x.dim() != 4:
            raise ValueError(f"{name}: {arg} must be 4-D [B, T, H, D], got shape {tuple(x.shape)}")
    B, T, Hq, K = q.shape
    Hkv = k.shape[2]
    if k.shape[:2] != (B, T) or k.shape[3] != K:
        raise ValueError(f"{name}: k has shape {tuple(k.shape)}, expected [B={B}, T={T}, Hkv, K={K}] "
                         f"to match q {tuple(q.shape)}")
    if g.shape != k.shape:
        raise ValueError(f"{name}: g has shape {tuple(g.shape)}, expected the shape of k {tuple(k.shape)}")
    if v.shape[:3] != (B, T, Hkv):
        raise ValueError(f"{name}: v has shape {tuple(v.shape)}, expected [B={B}, T={T}, Hkv={Hkv}, V]")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"{name}: query heads Hq={Hq} must be a multiple of KV heads Hkv={Hkv}")
    N = B
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError(f"{name}: cu_seqlens must be a 1-D integer tensor [N+1], "
                             f"got {cu_seqlens.dtype} shape {tuple(cu_seqlens.shape)}")
        if B != 1:
            raise ValueError(f"{name}: cu_seqlens requires batch size B == 1 (documents packed along T), "
                             f"got B={B}")
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != T:
            raise ValueError(f"{name}: cu_seqlens must start at 0 and end at T={T}, "
                             f"got {bounds[0]} ... {bounds[-1]}")
        if any(b > e for b, e in zip(bounds[:-1], bounds[1:])):
            raise ValueError(f"{name}: cu_seqlens must be non-decreasing, got {bounds}")
        N = len(bounds) - 1
    if initial_state is not None and tuple(initial_state.shape) != (N, Hkv, K, v.shape[3]):
        raise ValueError(f"{name}: initial_state has shape {tuple(initial_state.shape)}, "
                         f"expected [N={N}, Hkv={Hkv}, K={K}, V={v.shape[3]}]")
    return N


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.promote_types(q.dtype, torch.float32)


def _grouped(q: torch.Tensor, Hkv: int, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """q [B, T, Hq, K] -> scale * q as [B, T, Hkv, G, K]: query head h = kv * G + j (repeat_kv order)."""
    B, T, Hq, K = q.shape
    return q.to(dtype).reshape(B, T, Hkv, Hq // Hkv, K) * scale


def _recurrent_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                     state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step-by-step form. q [B, T, Hkv, G, K] (scaled), k/g [B, T, Hkv, K], v [B, T, Hkv, V],
    state [B, Hkv, K, V] -> o [B, T, Hkv, G, V], final state [B, Hkv, K, V]."""
    outs = []
    for t in range(q.shape[1]):
        state = g[:, t].exp()[..., None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhgk,bhkv->bhgv", q[:, t], state))
    if not outs:
        return q.new_zeros(*q.shape[:-1], v.shape[-1]), state
    return torch.stack(outs, dim=1), state


def _prepare(q, k, v, g, scale, initial_state, N):
    """Grouped, pre-scaled q [B, T, Hkv, G, K]; k, v, g and the entering states [N, Hkv, K, V] in
    the compute dtype."""
    K, Hkv, V = q.shape[3], v.shape[2], v.shape[3]
    dtype = _compute_dtype(q)
    qg = _grouped(q, Hkv, K ** -0.5 if scale is None else scale, dtype)
    if initial_state is None:
        states = q.new_zeros(N, Hkv, K, V, dtype=dtype)
    else:
        states = initial_state.to(dtype)
    return qg, k.to(dtype), v.to(dtype), g.to(dtype), states


def recurrent_gla_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *,
                            scale: float | None = None, initial_state: torch.Tensor | None = None,
                            output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Recurrent GLA, one time step at a time (the decoding form).

    q [B, T, Hq, K], k/g [B, T, Hkv, K], v [B, T, Hkv, V], initial_state [N, Hkv, K, V],
    cu_seqlens [N+1] (B == 1) -> o [B, T, Hq, V] in q's dtype, final_state [N, Hkv, K, V] in
    float32, float64 for float64 q (None unless output_final_state). N = B without cu_seqlens.
    """
    N = _check_inputs("recurrent_gla", q, k, v, g, initial_state, cu_seqlens)
    B, T, Hq, K = q.shape
    Hkv, V = v.shape[2], v.shape[3]
    qg, k, v, g, states = _prepare(q, k, v, g, scale, initial_state, N)
    if cu_seqlens is None:
        o, final = _recurrent_dense(qg, k, v, g, states)
    else:
        bounds = cu_seqlens.tolist()
        outs, finals = [], []
        for n, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
            o_n, s_n = _recurrent_dense(qg[:, bos:eos], k[:, bos:eos], v[:, bos:eos], g[:, bos:eos],
                                        states[n:n + 1])
            outs.append(o_n)
            finals.append(s_n)
        o, final = torch.cat(outs, dim=1), torch.cat(finals, dim=0)
    return o.reshape(B, T, Hq, V).to(q.dtype), (final if output_final_state else None)


def _segment_sums(g: torch.Tensor) -> torch.Tensor:
    """g [..., C, K] -> [..., C(t), C(s), K] holding sum_{s < i <= t} g_i for s <= t and -inf above.

    Summing each segment directly (rather than b_t - b_s of one running cumsum) keeps the small
    decay of nearby positions exact when the chunk's cumulative decay is huge; the -inf is set
    before exp, so exp never sees the positive sums of the masked (s > t) half.
    """
    C = g.shape[-2]
    idx = torch.arange(C, device=g.device)
    below = (idx[:, None] > idx[None, :])[:, :, None]              # [C(i), C(s), 1]: i > s
    sums = torch.cumsum(torch.where(below, g[..., :, None, :], 0.0), dim=-3)  # over i up to t
    causal = (idx[:, None] >= idx[None, :])[:, :, None]            # [C(t), C(s), 1]: s <= t
    return sums.masked_fill(~causal, float("-inf"))


def _chunk_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                 state: torch.Tensor, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked form. q [B, T, Hkv, G, K] (scaled), k/g [B, T, Hkv, K], v [B, T, Hkv, V],
    state [B, Hkv, K, V] -> o [B, T, Hkv, G, V], final state [B, Hkv, K, V]."""
    B, T, Hkv, G, K = q.shape
    V = v.shape[-1]
    # Zero padding (g = 0 means no decay, k = v = 0 adds nothing) leaves the state unchanged.
    pad = -T % C
    NC = (T + pad) // C
    q = F.pad(q, (0, 0, 0, 0, 0, 0, 0, pad)).reshape(B, NC, C, Hkv, G, K).permute(0, 3, 1, 4, 2, 5)
    k, v, g = (F.pad(x, (0, 0, 0, 0, 0, pad)).reshape(B, NC, C, Hkv, x.shape[-1]).permute(0, 3, 1, 2, 4)
               for x in (k, v, g))
    # q: [B, Hkv, NC, G, C, K]; k, g: [B, Hkv, NC, C, K]; v: [B, Hkv, NC, C, V]

    seg = _segment_sums(g)                                          # [B, Hkv, NC, C, C, K]
    # Decayed keys per KV head first, so the C x C x K tensor is not multiplied by the group size.
    k_decayed = k[..., None, :, :] * seg.exp()                      # [B, Hkv, NC, C(t), C(s), K]
    scores = torch.einsum("bhngtk,bhntsk->bhngts", q, k_decayed)
    o = scores @ v[:, :, :, None]                                   # [B, Hkv, NC, G, C, V]

    # Only non-positive log-decays are exponentiated: prefix sums (chunk start -> t) for reading
    # the incoming state, and suffix sums (s -> chunk end, = last row of seg) for writing it.
    decay_in = torch.cumsum(g, dim=-2).exp()                        # [B, Hkv, NC, C, K]
    decay_out = seg[..., -1, :, :].exp()                            # [B, Hkv, NC, C, K]
    chunk_decay = decay_in[..., -1, :]                              # [B, Hkv, NC, K]
    chunk_update = (k * decay_out).transpose(-1, -2) @ v            # [B, Hkv, NC, K, V]
    states = [state]
    for n in range(NC):
        states.append(chunk_decay[:, :, n, :, None] * states[-1] + chunk_update[:, :, n])
    entering = torch.stack(states[:-1], dim=2) if NC else state.new_zeros(B, Hkv, 0, K, V)
    o = o + (q * decay_in[:, :, :, None]) @ entering[:, :, :, None]  # [B, Hkv, NC, G, C, V]

    o = o.permute(0, 2, 4, 1, 3, 5).reshape(B, NC * C, Hkv, G, V)[:, :T]
    return o, states[-1]


def chunk_gla_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *,
                        scale: float | None = None, initial_state: torch.Tensor | None = None,
                        output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                        chunk_size: int = 16) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked GLA (the training form): exact, and finite for any log-decay down to -inf.

    q [B, T, Hq, K], k/g [B, T, Hkv, K], v [B, T, Hkv, V], initial_state [N, Hkv, K, V],
    cu_seqlens [N+1] (B == 1) -> o [B, T, Hq, V] in q's dtype, final_state [N, Hkv, K, V] in
    float32, float64 for float64 q (None unless output_final_state). N = B without cu_seqlens.
    Intra-chunk memory is a few times B * Hkv * T * chunk_size * K floats.
    """
    N = _check_inputs("chunk_gla", q, k, v, g, initial_state, cu_seqlens)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_gla: chunk_size must be a positive int, got {chunk_size!r}")
    B, T, Hq, K = q.shape
    Hkv, V = v.shape[2], v.shape[3]
    qg, k, v, g, states = _prepare(q, k, v, g, scale, initial_state, N)
    if cu_seqlens is None:
        o, final = _chunk_dense(qg, k, v, g, states, chunk_size)
        return o.reshape(B, T, Hq, V).to(q.dtype), (final if output_final_state else None)

    # Documents become rows of a zero-padded [N, Tmax] batch: the padding leaves each row's final
    # state equal to the state at the document's end, and one dense call replaces a loop per document.
    cu = cu_seqlens.to(device=q.device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    t_max = int(lengths.max())
    pos = torch.arange(t_max, device=q.device)
    valid = pos[None, :] < lengths[:, None]                         # [N, Tmax]
    src = torch.where(valid, cu[:-1, None] + pos[None, :], 0)       # [N, Tmax] indices into T
    packed = [torch.where(valid.view(N, t_max, *([1] * (x.dim() - 2))), x[0][src], 0.0)
              for x in (qg, k, v, g)]
    o, final = _chunk_dense(*packed, states, chunk_size)           # o [N, Tmax, Hkv, G, V]
    o = o[valid].reshape(1, T, Hq, V)                               # rows in document order
    return o.to(q.dtype), (final if output_final_state else None)
