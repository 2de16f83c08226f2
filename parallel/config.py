"""Parallel layout settings (`parallel.*`)."""
from dataclasses import dataclass

ZERO_STAGES = (0, 1, 2, 3)


@dataclass
class ParallelConfig:
    """Degrees of each strategy and the data-parallel engine's settings.

    dp: data-parallel degree; 0 means "whatever the world size leaves" (world / (pp*sp)).
    ep: expert-parallel degree, carved out of data parallelism (it divides dp): each group of
        `ep` data-parallel ranks splits the routed experts of every MoE layer among themselves
        and sends each token to the rank holding its expert (dropless all-to-all). Needs ZeRO
        stage 1-3 (the dense state is sharded over all dp x sp ranks, the expert state over the
        ranks holding the same experts).
    zero_stage: -1 = auto (1 when dp > 1, else 0). 0 replicates everything (DDP); 1 shards the
        optimizer state and the fp32 master weights, reducing gradients once per step; 2 also
        reduce-scatters gradients after every micro-batch (sharded gradient accumulation); 3 also
        frees each block's gathered weights after its forward and gathers them again for backward.
    offload_optimizer: keep the sharded master weights, gradients and AdamW state in host memory
        and step the optimizer on the CPU (ZeRO-3 on CUDA only).
    backend: "auto" picks nccl with CUDA and gloo otherwise.
    sp: sequence-parallel degree: each sequence is split along time over `sp` ranks, which then
        also shard the ZeRO state among themselves (stages 1-3; stage 0 is refused with sp > 1).
    sp_linear: how GLA layers pass state between SP ranks: lasp2 (all-gather of every rank's
        final state and decay) or allscan (a ring: O(1) volume per rank, sp - 1 hops).
    sp_softmax: how softmax layers see the whole sequence: ulysses (all-to-all sequence <-> heads),
        halo (window layers only: the previous `window` keys/values from the ranks before) or auto
        (per layer, the one that sends fewer bytes).
    ranks_per_node: ranks on each machine (0 = torchrun's LOCAL_WORLD_SIZE, i.e. its
        --nproc-per-node); ranks r * n .. (r + 1) * n - 1 share node r. Setting it below the real
        count simulates a cluster on one machine (the two-level collectives then run exactly as
        across nodes).
    two_level: where a group spans several nodes with several of its ranks on each (the expert
        all-to-all, the ZeRO reduce-scatters and weight gathers), exchange inside each node first
        and then across nodes between ranks of the same local index (`parallel.comm.Route`,
        `reduce_scatter_two_level`): never more bytes across nodes, fewer and larger messages.
        false keeps the flat NCCL/gloo collectives everywhere.
    """

    dp: int = 0
    pp: int = 1
    ep: int = 1
    sp: int = 1
    zero_stage: int = -1
    offload_optimizer: bool = False
    backend: str = "auto"
    sp_linear: str = "lasp2"
    sp_softmax: str = "auto"
    ranks_per_node: int = 0
    two_level: bool = True

    def __post_init__(self):
        for key in ("pp", "ep", "sp"):
            if getattr(self, key) < 1:
                raise ValueError(f"parallel.{key} must be >= 1, got {getattr(self, key)}")
        if self.ranks_per_node < 0:
            raise ValueError(f"parallel.ranks_per_node must be >= 0 (0 = torchrun's --nproc-per-node), "
                             f"got {self.ranks_per_node}")
        if self.dp < 0:
            raise ValueError(f"parallel.dp must be >= 0 (0 = derive from the world size), got {self.dp}")
        if self.zero_stage != -1 and self.zero_stage not in ZERO_STAGES:
            raise ValueError(f"parallel.zero_stage must be 0, 1, 2, 3 or -1 (auto), got {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage not in (-1, 3):
            raise ValueError(f"parallel.offload_optimizer=true needs parallel.zero_stage=3 (the engine "
                             f"offloads sharded state only), got zero_stage={self.zero_stage}")
        if self.sp_linear not in ("lasp2", "allscan"):
            raise ValueError(f"parallel.sp_linear must be lasp2 or allscan, got {self.sp_linear!r}")
        if self.sp_softmax not in ("auto", "ulysses", "halo"):
            raise ValueError(f"parallel.sp_softmax must be auto, ulysses or halo, got {self.sp_softmax!r}")
        if self.sp > 1 and self.zero_stage == 0:
            raise ValueError(f"parallel.sp={self.sp} needs ZeRO stage 1, 2 or 3 (sequence-parallel ranks "
                             f"shard the state they share); got parallel.zero_stage=0")
        if self.ep > 1 and self.zero_stage == 0:
            raise ValueError(f"parallel.ep={self.ep} needs ZeRO stage 1, 2 or 3 (each rank holds only its "
                             f"experts, so their state cannot be a replica); got parallel.zero_stage=0. "
                             f"Stage 1 costs the same traffic as stage 0")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"parallel.backend must be auto, nccl or gloo, got {self.backend!r}")

    def stage_for(self, dp: int) -> int:
        """The ZeRO stage in force for `dp` ranks sharing the state (data x sequence parallel)."""
        if self.zero_stage == -1:
            return 3 if self.offload_optimizer else (1 if dp > 1 else 0)
        return self.zero_stage
