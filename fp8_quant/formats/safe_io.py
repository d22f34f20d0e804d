"""Reads bounded before they allocate: regular files only, size caps, JSON nesting checked before it is parsed,
and safetensors opens whose errors name the file.

A shared workflow or a downloaded file decides what is read. A FIFO or a device named like a checkpoint would block
a read forever or stream without end, a header of a million entries or a JSON nested 100 000 deep would exhaust
memory or Python's recursion; each is refused here with the file and the limit named, before the allocation.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError

MAX_HEADER_BYTES = 100 * 2**20
# A DiT or a text encoder has a few thousand tensors; the largest single-file MoE checkpoints some ten thousands.
MAX_TENSORS = 100_000
# JSON values (commas + 1) a header of MAX_TENSORS tensors can hold: name, dtype, shape (up to 8 dims), 2 offsets.
MAX_HEADER_VALUES = 16 * MAX_TENSORS
# A safetensors header nests 3 deep ({name: {shape: [...]}}); ComfyUI's per-layer JSON about as much.
MAX_JSON_DEPTH = 32
MAX_LAYER_ENTRY_BYTES = 64 * 2**10  # one layer's ``.comfy_quant`` JSON: ComfyUI writes some 30-100 bytes
MAX_QUANT_METADATA_BYTES = 16 * 2**20  # ``_quantization_metadata``: one short entry per layer
MAX_SCALES_JSON_BYTES = 64 * 2**20  # a ``convert --calibrated`` JSON file: one number per layer

# A JSON string, matched in linear time: it ends at its closing quote or at the end of the input (an unterminated
# string), so the engine never backtracks and retries from the quotes inside it.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.S)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")
_FILE_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def _kind(mode: int) -> str:
    return _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")


def open_regular_file(path: str | os.PathLike) -> BinaryIO:
    """``path`` opened for binary reading, refused by name unless it is a regular file (links are followed).

    The kind is checked before the open (opening a FIFO for reading blocks until a writer comes) and again on the
    open descriptor (the name may have been swapped in between); ``O_NONBLOCK`` keeps that open from blocking."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (OSError, ValueError) as error:  # ValueError: a NUL byte in the name
        raise CheckpointError(f"{path}: cannot be read ({getattr(error, 'strerror', None) or error})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: is {_kind(mode)}, not a regular file")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(path, flags)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({error.strerror or error})") from None
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        raise CheckpointError(f"{path}: is {_kind(mode)}, not a regular file")
    return os.fdopen(descriptor, "rb")


def read_bounded(path: str | os.PathLike, limit: int) -> bytes:
    """The whole of a regular file of at most ``limit`` bytes; a larger one is refused before it is read."""
    with open_regular_file(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > limit:
            raise CheckpointError(f"{path}: {size} bytes; files of at most {limit} bytes are read here")
        data = handle.read(limit + 1)
    if len(data) > limit:  # it grew while being read
        raise CheckpointError(f"{path}: more than {limit} bytes; files of at most {limit} bytes are read here")
    return data


def json_depth(raw: bytes) -> int:
    """How deep ``raw``'s arrays and objects nest (brackets inside strings do not count), without parsing it: one
    pass of two regular expressions and a cumulative sum, linear in the input."""
    brackets = _NOT_BRACKET.sub(b"", _JSON_STRING.sub(b"", raw))
    if not brackets:
        return 0
    steps = torch.frombuffer(bytearray(brackets), dtype=torch.uint8)
    delta = (steps & 2).to(torch.int8) - 1  # '[' and '{' have bit 1 set, ']' and '}' not: +1 / -1
    return int(delta.cumsum(0, dtype=torch.int32).max())


def loads_bounded(raw: bytes | str, where: str, limit: int, max_depth: int = MAX_JSON_DEPTH) -> object:
    """``json.loads`` of at most ``limit`` bytes nested at most ``max_depth`` deep; else a ``CheckpointError``
    beginning with ``where`` (the file, and the entry within it: "FILE: header")."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if len(data) > limit:
        raise CheckpointError(f"{where} is {len(data)} bytes of JSON; at most {limit} are read")
    depth = json_depth(data)
    if depth > max_depth:
        raise CheckpointError(f"{where} is JSON nested {depth} deep; at most {max_depth} levels are read")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CheckpointError(f"{where} is not valid JSON ({error})") from None


def check_text(text: str, where: str) -> None:
    """A name or value that is valid Unicode: JSON's ``\\ud800`` escapes give lone surrogates, which no file or
    terminal can hold (printing one raises, safetensors refuses it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = text.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
        raise CheckpointError(f"{where} {shown!r} is not valid Unicode (a lone surrogate)") from None


@contextlib.contextmanager
def open_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> Iterator[_CheckedHandle]:
    """``safe_open`` whose failures (safetensors' own checks, I/O, a file changed since its header was read) are a
    ``CheckpointError`` naming the file; only a file checked by ``read_header`` should come here."""
    handle = tensor_reader(path, device)
    with handle.handle:
        yield handle


def tensor_reader(path: str | os.PathLike, device: str | torch.device = "cpu") -> _CheckedHandle:
    """An open safetensors file (closed when dropped) for a reader that keeps it across calls, as ``open_tensors``."""
    try:
        return _CheckedHandle(Path(path), safe_open(str(path), framework="pt", device=str(device)))
    except (OSError, RuntimeError, SafetensorError) as error:
        raise CheckpointError(f"{path}: could not read tensor data ({error})") from None


class _CheckedHandle:
    """A safetensors handle whose ``get_tensor`` names the file and the tensor when it fails."""

    def __init__(self, path: Path, handle) -> None:
        self.path, self.handle = path, handle

    def get_tensor(self, key: str) -> torch.Tensor:
        try:
            return self.handle.get_tensor(key)
        except (OSError, RuntimeError, SafetensorError) as error:
            raise CheckpointError(f"{self.path}: could not read tensor {key!r} ({error})") from None
