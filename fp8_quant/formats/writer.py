"""Stream a bf16/fp16/fp32 safetensors file into an FP8 one, one tensor at a time.

The header is planned from the input header alone (an fp8 weight has the source's shape, a scale's shape
follows from the granularity), written first, and then each tensor is read, converted and written, so peak
memory stays near the largest single tensor rather than the model.

Formats: ``comfy-scaled`` (``scale_weight`` + the ``scaled_fp8`` marker: loads in any ComfyUI with the stock
loader), ``comfy-quant`` (``weight_scale`` + per-layer ``.comfy_quant`` JSON: newer ComfyUI), and
``weight-scale`` (``weight_scale``/vLLM names, per-tensor or per-channel ``[N, 1]``: this pack's own loader).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import stat
import struct
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import SENSITIVE_LAYER_PATTERNS, check_patterns, matching_pattern, unmatched_patterns
from ..fp8_utils import HIGH_PRECISION_DTYPES, is_fp8_dtype, quantize_weight
from ..scheme import PER_TENSOR, GroupShape, weight_scale_shape
from .comfy_formats import FLOAT8_FORMATS
from .dialects import COMFY_QUANT_SUFFIX, HIGH_PRECISION, SCALED_FP8_MARKER, scan_header
from .header import DTYPE_NAMES, CheckpointError, read_header
from .safe_io import tensor_reader

logger = logging.getLogger(__name__)

COMFY_SCALED_FORMAT = "comfy-scaled"
COMFY_QUANT_FORMAT = "comfy-quant"
WEIGHT_SCALE_FORMAT = "weight-scale"
OUTPUT_FORMATS = (COMFY_SCALED_FORMAT, COMFY_QUANT_FORMAT, WEIGHT_SCALE_FORMAT)
_COMFY_FORMAT_NAMES = {dtype: name for name, dtype in FLOAT8_FORMATS.items()}


@dataclass
class ConvertReport:
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0
    calibrated: int = 0
    unmatched_skips: list[str] = field(default_factory=list)  # the caller's skip patterns that named no layer

    def summary(self) -> str:
        calibrated = f", {self.calibrated} with calibrated input scales" if self.calibrated else ""
        return (
            f"{len(self.quantized)} layers quantized{calibrated}, {len(self.skipped)} weights kept; "
            f"{self.bytes_in / 2**20:.1f} MiB -> {self.bytes_out / 2**20:.1f} MiB"
        )


@dataclass
class _Planned:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def convert_checkpoint(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    output_format: str = COMFY_SCALED_FORMAT,
    *,
    weight_dtype: torch.dtype = torch.float8_e4m3fn,
    weight_group: GroupShape = PER_TENSOR,
    skip_patterns: Iterable[str] = (),
    default_skips: bool = True,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int, str], None] | None = None,
    input_scales: Mapping[str, torch.Tensor] | None = None,
    overwrite: bool = True,
) -> ConvertReport:
    """Write ``destination``: every 2-D floating ``.weight`` not skipped becomes fp8 with its scale.

    ``weight_group``: per tensor (what ComfyUI's loaders read) or, in the ``weight-scale`` format, per channel.
    ``input_scales``: calibrated static input scales by layer name without the key prefix
    (``calibration.read_input_scales``); quantized layers that have one get it written as their input scale.
    ``overwrite=False``: an existing ``destination`` (also one another writer creates meanwhile) is an error and is
    left as it is. The file appears whole or not at all (``_AtomicFile``).
    """
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format: {output_format!r} is not allowed; allowed values: {list(OUTPUT_FORMATS)}")
    if not (weight_group.is_per_tensor() or weight_group.is_per_channel()):
        raise ValueError(f"weight_group: {weight_group.describe()} scales are not written yet")
    if not weight_group.is_per_tensor() and output_format != WEIGHT_SCALE_FORMAT:
        raise ValueError(
            f"{weight_group.describe()} scales are only written in the {WEIGHT_SCALE_FORMAT!r} format: ComfyUI's "
            f"loaders expect one scale per tensor in {output_format!r}"
        )
    if not is_fp8_dtype(weight_dtype):
        raise ValueError(f"weight_dtype: {weight_dtype} is not an fp8 dtype")
    skip_patterns = check_patterns("skip_patterns", tuple(skip_patterns))
    source, destination = Path(source), Path(destination)
    _check_destination(source, destination)
    scan = scan_header(read_header(source))
    if scan.dialect != HIGH_PRECISION:
        raise CheckpointError(f"{source}: already an fp8 checkpoint ({scan.dialect}); convert a bf16/fp16/fp32 file")
    patterns = skip_patterns + (SENSITIVE_LAYER_PATTERNS if default_skips else ())
    report = ConvertReport()
    plan: list[_Planned] = []
    handle = tensor_reader(source)
    prefix = scan.prefix

    for key, info in scan.header.tensors.items():
        report.bytes_in += info.nbytes
        layer = key[: -len(".weight")] if key.endswith(".weight") else None
        reason = _skip_reason(layer, info, patterns, scan.short_name(layer) if layer else "")
        if reason is not None:
            if layer is not None:
                report.skipped[layer] = reason
            plan.append(_Planned(key, info.dtype, info.shape, _reader(handle, key)))
            continue
        assert layer is not None
        report.quantized.append(layer)
        cache: dict[str, torch.Tensor] = {}
        quantize = _quantizer(handle, source, key, weight_dtype, weight_group, device, cache)
        scale_shape = stored_scale_shape(weight_scale_shape(weight_group, *info.shape), weight_group)
        scale_key, input_key = scale_keys(layer, output_format)
        plan.append(_Planned(key, weight_dtype, info.shape, lambda q=quantize: q()[0]))
        plan.append(_Planned(scale_key, torch.float32, scale_shape, _scale_from(cache, scale_shape)))
        calibrated = (input_scales or {}).get(scan.short_name(layer))
        if calibrated is not None:
            value = calibrated.float().reshape(())
            plan.append(_Planned(input_key, torch.float32, (), lambda v=value: v))
            report.calibrated += 1
        plan += layer_format_entries(layer, output_format, weight_dtype)
    plan += file_format_entries(prefix, output_format, weight_dtype)
    _check_calibration_matched(source, input_scales, [scan.short_name(layer) for layer in report.quantized])
    layers = [scan.short_name(key[: -len(".weight")]) for key in scan.header.tensors if key.endswith(".weight")]
    report.unmatched_skips = unmatched_patterns(skip_patterns, layers)
    for pattern in report.unmatched_skips:
        logger.info("%s: skip pattern %r matches no layer", source, pattern)
    metadata = dict(scan.header.metadata)
    metadata["fp8_quant"] = json.dumps({"format": output_format, "weight_group": weight_group.describe()})
    if not overwrite and os.path.lexists(destination):
        raise CheckpointError(f"{destination}: already exists; left as it is")
    _write_streaming(destination, plan, metadata, progress, overwrite)
    report.bytes_out = destination.stat().st_size
    logger.info("%s -> %s: %s", source, destination, report.summary())
    return report


def scale_keys(layer: str, output_format: str) -> tuple[str, str]:
    """The keys of ``layer``'s weight scale and input scale in ``output_format`` (comfy-scaled: ComfyUI's names)."""
    if output_format == COMFY_SCALED_FORMAT:
        return f"{layer}.scale_weight", f"{layer}.scale_input"
    return f"{layer}.weight_scale", f"{layer}.input_scale"


def stored_scale_shape(scale_shape: tuple[int, ...], group: GroupShape) -> tuple[int, ...]:
    """The shape a weight scale of ``group`` is written in: per-channel scales as ``[N, 1]``, the shape vLLM and
    FastVideo files use; the others as they are."""
    return (*scale_shape, 1) if group.is_per_channel() else tuple(scale_shape)


def layer_format_entries(layer: str, output_format: str, weight_dtype: torch.dtype) -> list[_Planned]:
    """What a fp8 layer carries beside its tensors in ``output_format``: comfy-quant's ``.comfy_quant`` JSON."""
    if output_format != COMFY_QUANT_FORMAT:
        return []
    payload = json.dumps({"format": _COMFY_FORMAT_NAMES[weight_dtype]}).encode()
    return [_Planned(f"{layer}.{COMFY_QUANT_SUFFIX}", torch.uint8, (len(payload),), _constant(payload))]


def file_format_entries(prefix: str, output_format: str, weight_dtype: torch.dtype) -> list[_Planned]:
    """What a whole file carries in ``output_format``: comfy-scaled's ``scaled_fp8`` marker of the fp8 dtype."""
    if output_format != COMFY_SCALED_FORMAT:
        return []
    return [_Planned(prefix + SCALED_FP8_MARKER, weight_dtype, (0,), lambda: torch.empty(0, dtype=weight_dtype))]


def _check_calibration_matched(source: Path, input_scales: Mapping | None, layers: list[str]) -> None:
    """Calibrated scales for another model (or named with another prefix) would write a file with none: refused
    before anything is written; a partial match is logged."""
    if not input_scales:
        return
    unmatched = sorted(set(input_scales) - set(layers))
    if len(unmatched) == len(input_scales):
        example = f"; its layers are named like {layers[0]!r}" if layers else ""
        raise CheckpointError(
            f"{source}: none of the {len(input_scales)} calibrated input scales names a quantized layer of this "
            f"file (e.g. {unmatched[0]!r}{example})"
        )
    if unmatched:
        logger.warning("%d calibrated input scales match no quantized layer (e.g. %r)", len(unmatched), unmatched[0])


def _skip_reason(layer: str | None, info, patterns: tuple[str, ...], short_name: str) -> str | None:
    if layer is None:
        return "not a weight"
    if len(info.shape) != 2:
        return f"{len(info.shape)}-D weight"
    if info.dtype not in HIGH_PRECISION_DTYPES:  # integers, fp8, e8m0 scales: nothing to quantize
        return f"dtype {info.dtype}"
    if info.numel == 0:
        return "empty weight"
    pattern = matching_pattern(short_name, patterns)
    if pattern is not None:
        return f"matched {pattern!r}"
    return None


def _reader(handle, key: str) -> Callable[[], torch.Tensor]:
    return lambda: handle.get_tensor(key)


def _constant(payload: bytes) -> Callable[[], torch.Tensor]:
    return lambda: torch.tensor(list(payload), dtype=torch.uint8)


def _quantizer(handle, source, key, weight_dtype, weight_group, device, cache):
    def quantize() -> tuple[torch.Tensor, torch.Tensor]:
        weight = handle.get_tensor(key).to(device)
        if not bool(torch.isfinite(weight).all()):
            raise CheckpointError(f"{source}: tensor {key!r} holds NaN or inf values; refusing to quantize it")
        try:
            fp8_weight, scale = quantize_weight(weight, weight_dtype, weight_group)
        except (RuntimeError, ValueError) as error:  # torch's own message does not say which tensor
            raise CheckpointError(f"{source}: tensor {key!r} could not be quantized ({error})") from None
        cache["scale"] = scale.cpu()
        return fp8_weight.cpu(), scale

    return quantize


def _scale_from(cache: dict[str, torch.Tensor], shape: tuple[int, ...]) -> Callable[[], torch.Tensor]:
    # The weight is always written (and so quantized) just before its scale.
    return lambda: cache.pop("scale").reshape(shape)


def _check_destination(source: Path, destination: Path) -> None:
    """Refuse an output that cannot be written before anything is read, saying why: creating the temporary file
    beside it would fail with an OSError about a name the user never gave."""
    if destination.is_dir():
        raise CheckpointError(f"{destination}: is a directory; name the output file")
    if not destination.parent.is_dir():
        raise CheckpointError(f"{destination}: folder {destination.parent} does not exist")
    if source.resolve() == destination.resolve():
        raise ValueError(f"{destination}: refusing to overwrite the source file")


def _write_streaming(
    destination: Path,
    plan: list[_Planned],
    metadata: dict[str, str],
    progress: Callable[[int, int, str], None] | None,
    overwrite: bool = True,
) -> None:
    """Write the planned file to ``destination`` atomically (see ``_AtomicFile``)."""
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
    with _AtomicFile(destination, overwrite) as out:
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


class _AtomicFile:
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

    def __enter__(self) -> _AtomicFile:
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
