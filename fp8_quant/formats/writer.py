"""Stream a bf16/fp16/fp32 safetensors file into an FP8 one, one tensor at a time.

The header is planned from the input header alone (an fp8 weight has the source's shape, a scale's shape
follows from the granularity), written first, and then each tensor is read, converted and written, so peak
memory stays near the largest single tensor rather than the model.

Output formats: the written dialects (``dialects.OUTPUT_DIALECTS``): ``comfy-scaled`` (``scale_weight`` + the
``scaled_fp8`` marker: loads in any ComfyUI with the stock loader), ``comfy-quant`` (``weight_scale`` + per-layer
``.comfy_quant`` JSON: newer ComfyUI), and ``weight-scale`` (``weight_scale``/vLLM names, per-tensor or per-channel
``[N, 1]``: this pack's own loader). Each dialect names its scales and adds its own entries; the file is written by
``streaming.write_streaming``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import SENSITIVE_LAYER_PATTERNS, check_patterns, matching_pattern, unmatched_patterns
from ..fp8_utils import HIGH_PRECISION_DTYPES, is_fp8_dtype, quantize_weight
from ..scheme import PER_TENSOR, GroupShape, weight_scale_shape
from .dialects import DEFAULT_OUTPUT_FORMAT, output_dialect, written_by
from .header import CheckpointError, read_header
from .safe_io import tensor_reader
from .scan import scan_header
from .streaming import PlannedTensor, write_streaming

logger = logging.getLogger(__name__)


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


def convert_checkpoint(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    output_format: str = DEFAULT_OUTPUT_FORMAT,
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

    ``output_format``: a written dialect's name. ``weight_group``: per tensor (what ComfyUI's loaders read) or, in
    a dialect that holds it (``weight-scale``), per channel.
    ``input_scales``: calibrated static input scales by layer name without the key prefix
    (``calibration.read_input_scales``); quantized layers that have one get it written as their input scale.
    ``overwrite=False``: an existing ``destination`` (also one another writer creates meanwhile) is an error and is
    left as it is. The file appears whole or not at all (``streaming.AtomicFile``).
    """
    dialect = output_dialect(output_format)
    if not (weight_group.is_per_tensor() or weight_group.is_per_channel()):
        raise ValueError(f"weight_group: {weight_group.describe()} scales are not written yet")
    if not dialect.holds_group(weight_group):
        holders = written_by(lambda other: other.holds_group(weight_group))
        raise ValueError(
            f"{weight_group.describe()} scales are only written in the {holders!r} format: ComfyUI's "
            f"loaders expect one scale per tensor in {output_format!r}"
        )
    if not is_fp8_dtype(weight_dtype):
        raise ValueError(f"weight_dtype: {weight_dtype} is not an fp8 dtype")
    skip_patterns = check_patterns("skip_patterns", tuple(skip_patterns))
    source, destination = Path(source), Path(destination)
    _check_destination(source, destination)
    scan = scan_header(read_header(source))
    if scan.dialect.quantized:
        raise CheckpointError(f"{source}: already an fp8 checkpoint ({scan.dialect}); convert a bf16/fp16/fp32 file")
    patterns = skip_patterns + (SENSITIVE_LAYER_PATTERNS if default_skips else ())
    report = ConvertReport()
    plan: list[PlannedTensor] = []
    handle = tensor_reader(source)
    prefix = scan.prefix

    for key, info in scan.header.tensors.items():
        report.bytes_in += info.nbytes
        layer = key[: -len(".weight")] if key.endswith(".weight") else None
        reason = _skip_reason(layer, info, patterns, scan.short_name(layer) if layer else "")
        if reason is not None:
            if layer is not None:
                report.skipped[layer] = reason
            plan.append(PlannedTensor(key, info.dtype, info.shape, _reader(handle, key)))
            continue
        assert layer is not None
        report.quantized.append(layer)
        cache: dict[str, torch.Tensor] = {}
        quantize = _quantizer(handle, source, key, weight_dtype, weight_group, device, cache)
        scale_shape = dialect.stored_scale_shape(weight_scale_shape(weight_group, *info.shape), weight_group)
        scale_key, input_key = dialect.scale_keys(layer)
        plan.append(PlannedTensor(key, weight_dtype, info.shape, lambda q=quantize: q()[0]))
        plan.append(PlannedTensor(scale_key, torch.float32, scale_shape, _scale_from(cache, scale_shape)))
        calibrated = (input_scales or {}).get(scan.short_name(layer))
        if calibrated is not None:
            value = calibrated.float().reshape(())
            plan.append(PlannedTensor(input_key, torch.float32, (), lambda v=value: v))
            report.calibrated += 1
        plan += dialect.layer_entries(layer, weight_dtype)
    plan += dialect.file_entries(prefix, weight_dtype)
    _check_calibration_matched(source, input_scales, [scan.short_name(layer) for layer in report.quantized])
    layers = [scan.short_name(key[: -len(".weight")]) for key in scan.header.tensors if key.endswith(".weight")]
    report.unmatched_skips = unmatched_patterns(skip_patterns, layers)
    for pattern in report.unmatched_skips:
        logger.info("%s: skip pattern %r matches no layer", source, pattern)
    metadata = dict(scan.header.metadata)
    metadata["fp8_quant"] = json.dumps({"format": str(dialect), "weight_group": weight_group.describe()})
    if not overwrite and os.path.lexists(destination):
        raise CheckpointError(f"{destination}: already exists; left as it is")
    write_streaming(destination, plan, metadata, progress, overwrite)
    report.bytes_out = destination.stat().st_size
    logger.info("%s -> %s: %s", source, destination, report.summary())
    return report


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
