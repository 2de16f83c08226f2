"""The sequence context under sequence parallelism (`parallel.sp` > 1).

A micro-batch of B rows of T tokens is split along time into `sp` contiguous slices of
T_l = T / sp tokens: SP rank p holds tokens [p * T_l, (p + 1) * T_l) of every row. The trainer
builds the context on the host from the rows' full position ids (`ShardedSequenceContext.slice`),
so a document that crosses a slice boundary stays one document: its later part keeps its
positions (RoPE) and, through the context, its linear-attention state and its keys.

Mixers see activations flattened as [1, B * T_l, ...] and ask the context for the sequence-mixing
core, as on one device:
- `linear_attention`: LASP-2 (`parallel.sp_linear=lasp2`: all-gather of every rank's final state
  and total decay) or the ring all-scan (`allscan`), `parallel/sequence/lasp2.py`.
- `softmax_attention`: Ulysses all-to-all (sequence <-> heads, `parallel/sequence/ulysses.py`) or,
  for a window, the halo exchange of the previous `window` keys/values
  (`parallel/sequence/halo.py`); `parallel.sp_softmax=auto` picks per layer the one that sends
  fewer bytes.
"""
from __future__ import annotations

import torch

from model.context import SequenceContext
from . import halo, ulysses
from .lasp2 import sp_linear_attention

LINEAR_METHODS = ("lasp2", "allscan")
SOFTMAX_METHODS = ("auto", "ulysses", "halo")


def _cu_seqlens(starts: torch.Tensor) -> torch.Tensor:
    """starts [B, L] bool (True where a document starts; every row start True) -> int32 [N+1]
    offsets over the B * L flattened tokens."""
    idx = torch.nonzero(starts.reshape(-1)).flatten()
    return torch.cat([idx, torch.tensor([starts.numel()])]).to(torch.int32)


class ShardedSequenceContext(SequenceContext):
    """This SP rank's slice of a micro-batch.

    position_ids [B, T_l]: the slice's positions within their documents (global, not restarted).
    cu_seqlens / local_cu_seqlens [N+1] int32: local document boundaries over the B * T_l local
    tokens, every row start included (also where a document continues from the previous rank).
    continues [B] bool: the row's slice starts inside a document begun on an earlier rank.
    global_cu_seqlens [M+1] int32: the unsplit rows' documents over the B * T global tokens.
    group: the sp process group (None in a world of one); sp_rank, sp_size; rows = B;
    slice_len = T_l. linear / softmax: the methods of `parallel.sp_linear` / `parallel.sp_softmax`.
    """

    def __init__(self, position_ids, local_cu_seqlens, continues, global_cu_seqlens, *, group,
                 sp_rank: int, sp_size: int, linear: str = "lasp2", softmax: str = "auto"):
        super().__init__(position_ids, local_cu_seqlens)
        if linear not in LINEAR_METHODS:
            raise ValueError(f"parallel.sp_linear must be one of {', '.join(LINEAR_METHODS)}, got {linear!r}")
        if softmax not in SOFTMAX_METHODS:
            raise ValueError(f"parallel.sp_softmax must be one of {', '.join(SOFTMAX_METHODS)}, got {softmax!r}")
        self.continues, self.global_cu_seqlens = continues, global_cu_seqlens
        self.group, self.sp_rank, self.sp_size = group, sp_rank, sp_size
        self.linear, self.softmax = linear, softmax
        self.rows, self.slice_len = position_ids.shape

    @property
    def local_cu_seqlens(self) -> torch.Tensor:
        return self.cu_seqlens

    @classmethod
    def slice(cls, position_ids: torch.Tensor, sp_rank: int, sp_size: int, group=None,
              linear: str = "lasp2", softmax: str = "auto") -> "ShardedSequenceContext":
        """The context of SP rank `sp_rank` from the full rows' position ids [B, T] (0 at every
        document start, as the loader packs them); T must be a multiple of sp_size."""
        b, t = position_ids.shape
        if t % sp_size:
            raise ValueError(f"sequence length {t} is not divisible by parallel.sp={sp_size} "
                             f"(set data.seq_len to a multiple of it)")
        n = t // sp_size
        starts = position_ids == 0
        starts[:, 0] = True
        lo, hi = sp_rank * n, (sp_rank + 1) * n
        local = starts[:, lo:hi].clone()
        continues = ~local[:, 0]
        local[:, 0] = True
        return cls(position_ids[:, lo:hi].clone(), _cu_seqlens(local), continues, _cu_seqlens(starts),
                   group=group, sp_rank=sp_rank, sp_size=sp_size, linear=linear, softmax=softmax)

    def to(self, device: torch.device | str) -> "ShardedSequenceContext":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return ShardedSequenceContext(move(self.position_ids), move(self.cu_seqlens), move(self.continues),
                                      move(self.global_cu_seqlens), group=self.group, sp_rank=self.sp_rank,
                                      sp_size=self.sp_size, linear=self.linear, softmax=self.softmax)

    def slice_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T] (a full row tensor: input ids, labels) -> this rank's slice [B, T_l]."""
        lo = self.sp_rank * self.slice_len
        return x[:, lo:lo + self.slice_len]

    def linear_attention(self, q, k, v, g, *, scale=None):
        return sp_linear_attention(q, k, v, g, scale=scale, local_cu_seqlens=self.cu_seqlens,
                                   continues=self.continues, group=self.group, method=self.linear)

    def softmax_attention(self, q, k, v, *, window=None, sink_k=None, sink_v=None, scale=None):
        kwargs = dict(window=window, sink_k=sink_k, sink_v=sink_v, scale=scale,
                      global_cu_seqlens=self.global_cu_seqlens, rows=self.rows, group=self.group)
        if self.softmax_method(window, q, k) == "halo":
            return halo.halo_attention(q, k, v, **kwargs)
        return ulysses.ulysses_attention(q, k, v, **kwargs)

    def softmax_method(self, window: int | None, q: torch.Tensor, k: torch.Tensor) -> str:
        """ulysses or halo for one layer: halo needs a window; `auto` takes the fewer bytes sent."""
        if window is None or self.softmax == "ulysses":
            return "ulysses"
        if self.softmax == "halo":
            return "halo"
        shapes = dict(rows=self.rows, slice_len=self.slice_len, sp=self.sp_size, kv_heads=k.shape[2],
                      head_dim=q.shape[3], element_size=q.element_size())
        sent_halo = halo.halo_volume(window=window, **shapes)
        return "halo" if sent_halo < ulysses.ulysses_volume(q_heads=q.shape[2], **shapes) else "ulysses"


def check_sequence_parallel(cfg) -> None:
    """Every constraint of `parallel.sp` on a run config, before anything is built: the sequence
    splits evenly, and softmax layers can spread their heads over the SP ranks (Ulysses)."""
    sp = cfg.parallel.sp
    if sp == 1:
        return
    if cfg.data.seq_len % sp:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} must be divisible by parallel.sp={sp}")
    m = cfg.model
    if any(mixer != "gla" for mixer in m.mixers):
        ulysses.ulysses_layout(m.num_heads, m.num_kv_heads, sp)
