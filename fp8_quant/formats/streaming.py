"""Streaming-writer primitives: a safetensors file planned from shapes alone, written one tensor at a time.

Every writer of the pack (``convert``, Save FP8 Model, the fit cache) plans its file as a list of
``PlannedTensor``: the key, dtype and shape are known before any value is made, so the header goes first and each
tensor is made just before it is written; peak memory stays near the largest single tensor rather than the model.
``write_streaming`` writes such a plan atomically (``AtomicFile``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import stat
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError
from .header import DTYPE_NAMES


@dataclass
class PlannedTensor:
    """One tensor of a planned file: what the header says of it, and how to make its values when they are written."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def constant_bytes(payload: bytes) -> Callable[[], torch.Tensor]:
    """A maker for a uint8 tensor holding ``payload`` (a JSON entry stored as a tensor)."""
    return lambda: torch.tensor(list(payload), dtype=torch.uint8)


def write_streaming(
    destination: Path,
    plan: list[PlannedTensor],
    metadata: dict[str, str],
    progress: Callable[[int, int, str], None] | None,
    overwrite: bool = True,
) -> None:
    """Write the planned file to ``destination`` atomically (see ``AtomicFile``): the header first, then each
    tensor made (``PlannedTensor.make``) just before it is written; ``progress(done, total, key)`` after each."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for item in plan:
        header[item.key] = {
            "dtype": DTYPE_NAMES[item.dtype],
            "shape": list(item.shape),
            "data_offsets": [offset, offset + item.nbytes],
        }
        offset += item.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with AtomicFile(destination, overwrite) as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        for index, item in enumerate(plan):
            tensor = item.make()
            if tensor.dtype != item.dtype or tuple(tensor.shape) != item.shape:
                raise RuntimeError(
                    f"{item.key}: planned {item.dtype}{item.shape}, got {tensor.dtype}{tuple(tensor.shape)}"
                )
            if tensor.numel():
                out.write(tensor.reshape(-1).contiguous().view(torch.uint8).numpy().data)
            if progress is not None:
                progress(index + 1, len(plan), item.key)


class AtomicFile:
    """A new file at ``destination`` that appears whole or not at all.

    The data goes to a temporary file created exclusively (``O_CREAT | O_EXCL | O_NOFOLLOW``, a random name, by
    ``tempfile.mkstemp``) in the destination's own folder: a link planted at a predictable name is never followed,
    a second writer gets a file of its own, and nothing outside that folder is touched. It is flushed to the disk
    and renamed over the destination in one step; any failure or interruption (an exception, Ctrl-C, SIGTERM
    raised as an exception) leaves the destination as it was and removes the temporary file. ``overwrite=False``
    publishes with a hard link, which fails where the destination appeared meanwhile (another writer won): an
    error naming it, and the other writer's file is left whole. A write error (a full disk) is an ``OSError``
    naming the destination, not the temporary name the user never gave.
    """

    def __init__(self, destination: Path, overwrite: bool) -> None:
        self.destination, self.overwrite = destination, overwrite
        self.fd, self.temporary = -1, ""

    def __enter__(self) -> AtomicFile:
        try:
            self._checked(self._create)
        except BaseException:
            self._clean_up()
            raise
        return self

    def _create(self) -> None:
        name, folder = self.destination.name, self.destination.parent
        self.fd, self.temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=folder)
        if hasattr(os, "fchmod"):  # mkstemp's 0600 would hide the model from other users and containers
            os.fchmod(self.fd, _new_file_mode(self.destination))

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            written = self._checked(functools.partial(os.write, self.fd, view))
            view = view[written:]

    def __exit__(self, kind, error, trace) -> None:
        try:
            if kind is None:
                self._checked(lambda: os.fsync(self.fd))
                os.close(self.fd)
                self.fd = -1
                self._checked(self._publish)
                _sync_folder(self.destination.parent)
        finally:
            self._clean_up()

    def _clean_up(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.temporary:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.temporary)

    def _publish(self) -> None:
        if self.overwrite:
            os.replace(self.temporary, self.destination)
            return
        try:
            os.link(self.temporary, self.destination)
        except FileExistsError:
            raise CheckpointError(
                f"{self.destination}: another writer created it while this one was writing; left as it is"
            ) from None
        except OSError:  # a file system without hard links: the same check, with a moment's window
            if os.path.lexists(self.destination):
                raise CheckpointError(f"{self.destination}: already exists; left as it is") from None
            os.replace(self.temporary, self.destination)

    def _checked(self, operation):
        try:
            return operation()
        except OSError as error:
            raise OSError(error.errno, error.strerror or str(error), str(self.destination)) from None


def _new_file_mode(destination: Path) -> int:
    """The mode a plainly created file would get (``0o666`` less the umask), or that of the file it replaces."""
    with contextlib.suppress(OSError):
        existing = os.lstat(destination)
        if stat.S_ISREG(existing.st_mode):
            return stat.S_IMODE(existing.st_mode)
    umask = 0o022
    with contextlib.suppress(OSError, ValueError, IndexError):  # Linux names it; os.umask would change it
        status = Path("/proc/self/status").read_text()
        umask = int(next(line for line in status.splitlines() if line.startswith("Umask:")).split()[1], 8)
    return 0o666 & ~umask


def _sync_folder(folder: Path) -> None:
    """The rename made durable too, where the system allows opening a folder (not Windows)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
