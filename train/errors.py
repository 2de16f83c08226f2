"""The error that stops a run (launch/pretrain.py prints it as "error: ..." and exits 1)."""


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row, a checkpoint that cannot be
    written)."""
