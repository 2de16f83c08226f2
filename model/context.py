"""Sequence context: what a token mixer needs to know about the sequence it mixes.

Mixers never look at document boundaries, positions or (later) sequence-parallel ranks
themselves: they compute projections and hand the sequence-mixing core to the context. The
single-device context here runs the ops directly; a sequence-parallel context (in `parallel/`)
subclasses it and adds the communication (LASP-2 state passing for linear attention, Ulysses
all-to-all and window halos for softmax attention) without touching model code.
"""
from __future__ import annotations

import torch

from ops.attention import attention
from ops.gla import chunk_gla
from ops.rope import rope_cos_sin


class SequenceContext:
    """Positions and document boundaries of one forward pass.

    position_ids [B, T]: position within the document (0 at each document start).
    cu_seqlens [N+1] (int32) or None: document boundaries over the flattened B*T tokens; when
    set, mixers see activations flattened to [1, B*T, ...] so no state or attention crosses a
    document (or row) boundary.
    """

    def __init__(self, position_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None):
        self.position_ids = position_ids
        self.cu_seqlens = cu_seqlens
        self._rope: dict[tuple[int, float], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor, packed: bool = True) -> "SequenceContext":
        """Document starts are where the position restarts at 0, and every row start.

        Rows holding one document each need no cu_seqlens (the dense batched kernels run); so does
        packed=False, which treats every row as one sequence.
        """
        if not packed:
            return cls(position_ids)
        b, t = position_ids.shape
        starts = position_ids == 0
        starts[:, 0] = True
        if bool(starts[:, 1:].any()):
            idx = torch.nonzero(starts.reshape(-1)).flatten()
            end = torch.tensor([b * t], device=idx.device, dtype=idx.dtype)
            return cls(position_ids, torch.cat([idx, end]).to(torch.int32))
        return cls(position_ids)

    def to(self, device: torch.device | str) -> "SequenceContext":
        """The same context on `device`. Build it from host position ids and move it: finding the
        document starts then costs no device-to-host synchronisation in the training step."""
        cu = None if self.cu_seqlens is None else self.cu_seqlens.to(device, non_blocking=True)
        return SequenceContext(self.position_ids.to(device, non_blocking=True), cu)

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def rope(self, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B', T', head_dim] matching the mixers' (possibly flattened) layout; cached per pass."""
        key = (head_dim, theta)
        if key not in self._rope:
            pos = self.position_ids.reshape(1, -1) if self.packed else self.position_ids
            self._rope[key] = rope_cos_sin(pos, head_dim, theta)
        return self._rope[key]

    def softmax_attention(self, q, k, v, *, window=None, sink_k=None, sink_v=None, scale=None):
        """q [B, T, Hq, D], k/v [B, T, Hkv, D], sinks [S, Hkv, D] -> [B, T, Hq, D]."""
        return attention(q, k, v, window=window, sink_k=sink_k, sink_v=sink_v,
                         cu_seqlens=self.cu_seqlens, scale=scale)

    def linear_attention(self, q, k, v, g, *, scale=None):
        """q [B, T, Hq, K], k/g [B, T, Hkv, K], v [B, T, Hkv, V] -> o [B, T, Hq, V]."""
        o, _ = chunk_gla(q, k, v, g, scale=scale, cu_seqlens=self.cu_seqlens)
        return o
