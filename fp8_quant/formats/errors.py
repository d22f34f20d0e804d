"""The error type of every checkpoint read and write: a ``ValueError`` whose message names the file (and the tensor)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded faithfully; the message names the file and the tensor."""
