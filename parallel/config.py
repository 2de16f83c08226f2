"""Parallel layout settings (`parallel.*`)."""
from dataclasses import dataclass


@dataclass
class ParallelConfig:
    """Degrees of each strategy; dp=0 means "whatever the world size leaves" (world / (pp*ep*sp)).

    backend: "auto" picks nccl with CUDA and gloo otherwise.
    """

    dp: int = 0
    pp: int = 1
    ep: int = 1
    sp: int = 1
    backend: str = "auto"

    def __post_init__(self):
        for key in ("pp", "ep", "sp"):
            if getattr(self, key) < 1:
                raise ValueError(f"parallel.{key} must be >= 1, got {getattr(self, key)}")
        if self.dp < 0:
            raise ValueError(f"parallel.dp must be >= 0 (0 = derive from the world size), got {self.dp}")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"parallel.backend must be auto, nccl or gloo, got {self.backend!r}")
