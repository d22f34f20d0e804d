"""The error type of every checkpoint read and write: a ``ValueError`` whose message names the file (and the tensor)."""

from ..messages import printable


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded faithfully; the message names the file and the tensor.

    The message is kept to one line of printable text: file and tensor names come from the user's disk and from
    the file itself, and a newline or an ESC in them must not split the line or reach the terminal raw."""

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(printable(message), *args)
