"""Sequence parallelism (`parallel.sp`): the sharded sequence context and the mixer cores it runs
(LASP-2 / all-scan for linear attention, Ulysses / halo for softmax attention)."""
from .context import LINEAR_METHODS, SOFTMAX_METHODS, ShardedSequenceContext, check_sequence_parallel

__all__ = ["LINEAR_METHODS", "SOFTMAX_METHODS", "ShardedSequenceContext", "check_sequence_parallel"]
