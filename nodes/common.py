"""What every node of the pack shares: its graph-editor category and how its errors reach the user."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from fp8_quant.config import unmatched_patterns

logger = logging.getLogger(__name__)

CATEGORY = "loaders/fp8"  # the graph-editor extension (web/) finds the pack's nodes by it


@contextlib.contextmanager
def node_error(node: str, path: object = None) -> Iterator[None]:
    """Turn any exception into one line naming the node (and the file): the core's ``ValueError``s (bad options,
    bad files, bad layers) as they are, anything unforeseen with its type, its traceback in the console log.

    Out-of-memory errors and ComfyUI's interrupt pass through untouched: ComfyUI frees memory and explains
    out-of-memory itself, and an interrupt must reach its executor to stop the prompt."""
    try:
        yield
        return
    except Exception as error:
        if _passes_through(error):
            raise
        if isinstance(error, ValueError):
            message = str(error)
        else:
            logger.exception("%s failed%s", node, f" on {path}" if path is not None else "")
            message = f"{type(error).__name__}: {error} (details in the console log)"
    message = " ".join(message.split())  # one line: torch's messages span several
    where = f"{path}: " if path is not None and str(path) not in message else ""
    raise RuntimeError(f"{node}: {where}{message}") from None


def _passes_through(error: Exception) -> bool:
    """Out of memory (torch's or Python's) and ComfyUI's ``InterruptProcessingException`` (matched by name: this
    module imports ``comfy`` only inside the nodes)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return any(cls.__name__ == "InterruptProcessingException" for cls in type(error).__mro__)


def unmatched_skips_note(node: str, patterns: tuple[str, ...], report) -> str:
    """``skip_layers`` patterns that named no linear of the model: logged as a warning and said on the node (a
    typo would otherwise keep nothing and say nothing); empty where every pattern matched."""
    unmatched = unmatched_patterns(patterns, (layer.name for layer in report.layers))
    if not unmatched:
        return ""
    listed = ", ".join(repr(pattern) for pattern in unmatched)
    logger.warning("%s: skip_layers %s matched no layer of this model", node, listed)
    return f"; skip_layers {listed} matched no layer"
