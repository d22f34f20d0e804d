"""Read and validate a safetensors header without touching tensor data.

Everything after the header is checked against it before any tensor is read, so a truncated or corrupt file
is an error naming the file and the tensor, never a half-loaded model. Only safetensors is read: no pickle.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointError
from .safe_io import (
    MAX_HEADER_BYTES,
    MAX_HEADER_VALUES,
    MAX_JSON_DEPTH,
    MAX_TENSORS,
    check_text,
    loads_bounded,
    open_regular_file,
)

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,  # mxfp8 scales (ComfyUI 0.30)
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_ITEM_SIZES: dict[str, int] = {name: dtype.itemsize for name, dtype in SAFETENSORS_DTYPES.items()}
__all__ = ["DTYPE_NAMES", "SAFETENSORS_DTYPES", "CheckpointError", "SafetensorsHeader", "TensorInfo", "read_header"]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    data_start: int = 0
    file_size: int = 0


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and check the header of ``path``: sizes, JSON shape, dtypes and every tensor's byte range.

    Bounded before anything is allocated: a regular file only, a header of at most ``MAX_HEADER_BYTES``, at most
    ``MAX_TENSORS`` tensors and ``MAX_JSON_DEPTH`` levels of nesting, counted before the JSON is parsed."""
    path = Path(path)
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise CheckpointError(f"{path}: only .safetensors files are read (no pickle, no torch.load)")
    with open_regular_file(path) as handle:
        file_size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated file ({file_size} bytes), no safetensors header")
        (header_size,) = struct.unpack("<Q", prefix)
        # A safetensors header is JSON: where no "{" follows the size, the first 8 bytes are not a size at all (a
        # picture, a text, a link to some other file), and showing them as a number would only mislead.
        if handle.read(1) != b"{":
            raise CheckpointError(f"{path}: not a safetensors file (no JSON header after the 8-byte header size)")
        if header_size > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: header is over the {MAX_HEADER_BYTES // 2**20} MiB limit")
        if 8 + header_size > file_size:
            raise CheckpointError(
                f"{path}: header runs past the end of the file ({file_size} bytes): truncated or corrupt file"
            )
        handle.seek(8)
        raw = handle.read(header_size)
    if len(raw) != header_size:
        raise CheckpointError(f"{path}: header of {header_size} bytes, but only {len(raw)} could be read")
    # Counted on the raw bytes (commas inside strings too: no real header comes near the cap), so that a header of
    # a million entries is refused in milliseconds, before the parser builds a million objects.
    separators = raw.count(b",")
    if separators > MAX_HEADER_VALUES:
        raise CheckpointError(
            f"{path}: header holds {separators} JSON separators, more than {MAX_TENSORS} tensors can have (the limit)"
        )
    parsed = loads_bounded(raw, f"{path}: header", MAX_HEADER_BYTES, MAX_JSON_DEPTH)
    if not isinstance(parsed, dict):
        raise CheckpointError(f"{path}: header JSON is a {type(parsed).__name__}, not an object")
    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: __metadata__ is not an object")
    if len(parsed) > MAX_TENSORS:
        raise CheckpointError(f"{path}: header lists {len(parsed)} tensors; at most {MAX_TENSORS} are read")
    data_start = 8 + header_size
    data_size = file_size - data_start
    tensors = {name: _tensor_info(path, name, entry, data_size) for name, entry in parsed.items()}
    _check_tiling(path, tensors, data_size)
    text_metadata = {str(k): str(v) for k, v in metadata.items()}
    for key, value in text_metadata.items():
        check_text(key, f"{path}: metadata key")
        check_text(value, f"{path}: metadata {key!r} value")
    return SafetensorsHeader(path, tensors, text_metadata, data_start, file_size)


def _check_tiling(path: Path, tensors: dict[str, TensorInfo], data_size: int) -> None:
    """The format's rule: tensors cover the data bytes exactly, in order, no gap, no overlap, nothing after."""
    end = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != end:
            what = "overlaps the tensor before it" if info.begin < end else f"leaves a gap at byte {end}"
            raise CheckpointError(f"{path}: tensor {info.name!r} at bytes {info.begin}..{info.end} {what}")
        end = info.end
    if end != data_size:
        raise CheckpointError(f"{path}: {data_size - end} bytes after the last tensor; the file is corrupt")


def _is_count(value: object) -> bool:
    """A JSON integer >= 0 (``true`` is a Python int too, but no size or offset)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_info(path: Path, name: str, entry: object, data_size: int) -> TensorInfo:
    check_text(name, f"{path}: tensor name")
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry")
    dtype_name = entry["dtype"]
    dtype = SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name!r}")
    shape = entry["shape"]
    offsets = entry["data_offsets"]
    if not (isinstance(shape, list) and len(shape) <= 8 and all(_is_count(d) for d in shape)):
        raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise CheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise CheckpointError(
            f"{path}: tensor {name!r} lies at bytes {begin}..{end}, outside the {data_size} data bytes "
            "(truncated or corrupt file)"
        )
    expected = math.prod(shape) * _ITEM_SIZES[dtype_name]
    if end - begin != expected:
        raise CheckpointError(
            f"{path}: tensor {name!r} spans {end - begin} bytes but {dtype_name}{shape} needs {expected}"
        )
    return TensorInfo(name, dtype, tuple(shape), begin, end)
