"""Load an FP8 checkpoint of any dialect into one canonical state dict.

Canonical form: ``<layer>.weight`` (fp8 or high precision), ``<layer>.weight_scale`` (float32, ``[]``, ``[N]``
or blocks, ``scheme.weight_scale_shape``) and ``<layer>.input_scale`` (float32 ``[]``) for fp8 layers; markers
(``scaled_fp8``, ``.comfy_quant``) are consumed, other scale names mapped, ``mxfp8`` e8m0 scales unswizzled to
float32 groups of 32 (the weight keeps ComfyUI's padding to 32; the loader crops it to the model's shape), and
a plain fp8 cast gets explicit unit scales. ComfyUI's ``int8_tensorwise`` layers keep their int8 weight and get a
float32 scale ``[]`` or ``[N]``; their ConvRot groups come with the checkpoint (``Fp8Checkpoint.int8_layers``). The
config inferred from the file comes with it, so loading a pre-quantized file needs no user choices. Layers in a
4-bit format (``nvfp4``, ``convrot_w4a4``) are an error that names ComfyUI's own loader.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open

from ..config import Fp8Config
from ..fp8_utils import check_scale, count_fp8_non_finite, unit_weight_scale
from ..scheme import weight_scale_shape
from .comfy_formats import (
    FP8_FORMATS,
    INT8_TENSORWISE,
    MX_GROUP,
    MX_SCALE_DTYPES,
    MXFP8,
    NON_FP8_FORMATS,
    REFUSED_FORMATS,
    decode_mx_scale,
    int8_rotation_group,
    mx_scale_shape,
    weight_dtype_of,
)
from .dialects import COMFY_QUANT_SUFFIX, QUANT_METADATA_KEY, SCALE_ALIASES
from .header import CheckpointError, read_header
from .safe_io import MAX_LAYER_ENTRY_BYTES, loads_bounded, open_tensors
from .scan import CheckpointScan, LayerInfo, check_scale_shape, scan_header

logger = logging.getLogger(__name__)


@dataclass
class Fp8Checkpoint:
    scan: CheckpointScan
    config: Fp8Config | None
    state_dict: dict[str, torch.Tensor]

    @property
    def path(self):
        return self.scan.path

    @property
    def int8_layers(self) -> dict[str, int | None]:
        """Each ``int8_tensorwise`` layer by its name without the file's prefix (as the model names it), with its
        ConvRot group (``None``: not rotated)."""
        return {self.scan.short_name(layer.name): layer.rotation_group for layer in self.scan.int8_layers}


def scan_checkpoint(path: str | os.PathLike) -> CheckpointScan:
    """Header only: dialect, prefix and layers, with no tensor data read."""
    return scan_header(read_header(path))


def load_checkpoint(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
    scan: CheckpointScan | None = None,
) -> Fp8Checkpoint:
    """Read every tensor of ``path`` and return it in canonical form, validated (scales finite and > 0).

    ``scan``: the header scan of the same file, when the caller already made one.
    """
    scan = scan if scan is not None else scan_checkpoint(path)
    for warning in scan.warnings:
        logger.warning("%s: %s", scan.path, warning)
    layer_formats = read_layer_formats(scan)
    refuse_non_fp8_formats(scan, layer_formats)
    state_dict: dict[str, torch.Tensor] = {}
    names = list(scan.header.tensors)
    consumed = _consumed_keys(scan)
    try:
        with safe_open(str(scan.path), framework="pt", device=str(device)) as handle:
            for index, key in enumerate(names):
                if key not in consumed:
                    state_dict[_canonical_key(key)] = handle.get_tensor(key)
                if progress is not None:
                    progress(index + 1, len(names))
    except (OSError, RuntimeError, SafetensorError) as error:  # the header was checked; this is I/O or a race
        raise CheckpointError(f"{scan.path}: could not read tensor data ({error})") from None
    for layer in scan.layers.values():
        _finish_layer(scan, layer, state_dict, layer_formats.get(layer.name))
    return Fp8Checkpoint(scan, scan.dialect.loading_config(scan), state_dict)


def read_layer_formats(scan: CheckpointScan) -> dict[str, str]:
    """Each layer's declared layer format (in a dialect that ``declares_layer_formats``), validated against its
    weight and scales (FP8 formats) and noted on its ``LayerInfo``; formats that are not FP8 are returned as they
    are (``refuse_non_fp8_formats``)."""
    if not scan.dialect.declares_layer_formats:
        return {}
    formats: dict[str, str] = {}
    entries: dict[str, tuple[str, dict]] = {}  # layer -> (where its entry is, the entry)
    if scan.quant_metadata is not None:
        for name, entry in scan.quant_metadata.items():
            full_name = name if name in scan.layers else scan.prefix + name
            where = f"{QUANT_METADATA_KEY}[{name!r}]"
            formats[full_name] = _layer_format_of(scan, where, entry)
            entries[full_name] = (where, entry)
    quant_layers = [layer for layer in scan.layers.values() if layer.comfy_quant is not None]
    for layer in quant_layers:  # sizes first, from the header: a payload is read whole
        key = f"{layer.name}.{COMFY_QUANT_SUFFIX}"
        if layer.comfy_quant.nbytes > MAX_LAYER_ENTRY_BYTES or layer.comfy_quant.dtype != torch.uint8:
            raise CheckpointError(
                f"{scan.path}: {key!r} is {layer.comfy_quant.dtype} of {layer.comfy_quant.nbytes} bytes; a layer's "
                f"format entry is uint8 JSON of at most {MAX_LAYER_ENTRY_BYTES} bytes"
            )
    if quant_layers:
        with open_tensors(scan.path) as handle:
            for layer in quant_layers:
                key = f"{layer.name}.{COMFY_QUANT_SUFFIX}"
                raw = handle.get_tensor(key).flatten().numpy().tobytes()
                entry = loads_bounded(raw, f"{scan.path}: {key!r}", MAX_LAYER_ENTRY_BYTES)
                formats[layer.name] = _layer_format_of(scan, key, entry)
                entries[layer.name] = (key, entry)
    for name, fmt in formats.items():
        layer = scan.layers.get(name)
        if layer is None:
            raise CheckpointError(f"{scan.path}: quantization entry for {name!r} has no matching weight")
        layer.layer_format = fmt
        if fmt in FP8_FORMATS:
            _check_fp8_format(scan, layer, fmt)
        elif fmt == INT8_TENSORWISE:
            where, entry = entries[name]
            try:
                layer.rotation_group = int8_rotation_group(entry, f"{scan.path}: {where}")
            except ValueError as error:
                raise CheckpointError(str(error)) from None
            _check_int8_format(scan, layer)
    return formats


def refuse_non_fp8_formats(scan: CheckpointScan, layer_formats: dict[str, str]) -> None:
    """The one-line error for a file whose layers use a layer format this pack does not read (4-bit weights)."""
    for name, fmt in layer_formats.items():
        if fmt in REFUSED_FORMATS:
            raise CheckpointError(
                f"{scan.path}: layer {scan.short_name(name)!r} is in ComfyUI's {fmt} format, which is not FP8; "
                "load this file with ComfyUI's own Load Diffusion Model node, which handles it"
            )


def _check_fp8_format(scan: CheckpointScan, layer: LayerInfo, fmt: str) -> None:
    """The weight dtype and the scales an FP8 format stores (checked here, not at the header scan, per format)."""
    if layer.weight.dtype != weight_dtype_of(fmt):
        raise CheckpointError(
            f"{scan.path}: layer {layer.name!r} declares format {fmt} but its weight is {layer.weight.dtype}"
        )
    input_scale = layer.input_scale
    if input_scale is not None:
        check_scale_shape(scan.path, _stored_name(layer, "input_scale"), input_scale, layer.weight, "input_scale")
    scale = layer.weight_scale
    if scale is None:
        return  # the dialect check names the missing scale
    if fmt != MXFP8:
        check_scale_shape(scan.path, _stored_name(layer, "weight_scale"), scale, layer.weight, "weight_scale")
        return
    rows, in_features = layer.weight.shape
    expected = mx_scale_shape(rows, in_features)
    if in_features % MX_GROUP or scale.dtype not in MX_SCALE_DTYPES or tuple(scale.shape) != expected:
        raise CheckpointError(
            f"{scan.path}: mxfp8 layer {layer.name!r} has weight {list(layer.weight.shape)} and scale "
            f"{scale.dtype} {list(scale.shape)}; mxfp8 stores inputs padded to {MX_GROUP} and e8m0 scales "
            f"{list(expected)}"
        )


def _check_int8_format(scan: CheckpointScan, layer: LayerInfo) -> None:
    """An ``int8_tensorwise`` layer: a 2-D int8 weight, a float scale of one value or one per row, and a rotation
    group that divides its inputs (ComfyUI's own forward could not run it otherwise)."""
    weight, scale = layer.weight, layer.weight_scale
    what = f"{scan.path}: int8_tensorwise layer {layer.name!r}"
    if weight.dtype != torch.int8 or len(weight.shape) != 2:
        raise CheckpointError(f"{what} has a {weight.dtype} weight of shape {list(weight.shape)}; expected 2-D int8")
    rows, in_features = weight.shape
    if scale is None:
        raise CheckpointError(f"{what} has no weight_scale")
    if scale.dtype not in (torch.float32, torch.bfloat16, torch.float16) or tuple(scale.shape) not in (
        (), (1,), (rows,), (rows, 1), (1, 1)
    ):
        raise CheckpointError(
            f"{what} has a weight_scale {scale.dtype} {list(scale.shape)}; expected a float scale [], [{rows}] or "
            f"[{rows}, 1]"
        )
    if layer.rotation_group is not None and in_features % layer.rotation_group:
        raise CheckpointError(
            f"{what}: convrot_groupsize {layer.rotation_group} does not divide its {in_features} input features"
        )


def _layer_format_of(scan: CheckpointScan, where: str, entry: object) -> str:
    if not isinstance(entry, dict) or not isinstance(entry.get("format"), str):
        raise CheckpointError(f"{scan.path}: {where} must be a JSON object with a 'format' string, got {entry!r}")
    fmt = entry["format"]
    if fmt not in FP8_FORMATS and fmt not in NON_FP8_FORMATS:
        raise CheckpointError(f"{scan.path}: {where} names format {fmt!r}; this pack reads {list(FP8_FORMATS)}")
    return fmt


def _consumed_keys(scan: CheckpointScan) -> set[str]:
    keys = {key for key in scan.header.tensors if key.endswith("." + COMFY_QUANT_SUFFIX)}
    if scan.marker is not None:
        keys.add(scan.marker.name)
    return keys


def _canonical_key(key: str) -> str:
    layer, _, suffix = key.rpartition(".")
    return f"{layer}.{SCALE_ALIASES[suffix]}" if suffix in SCALE_ALIASES else key


def _finish_layer(scan: CheckpointScan, layer: LayerInfo, state_dict: dict[str, torch.Tensor], fmt: str | None) -> None:
    weight_key = f"{layer.name}.weight"
    scale_key = f"{layer.name}.weight_scale"
    input_key = f"{layer.name}.input_scale"
    if fmt == INT8_TENSORWISE:  # int8 values and their scale, kept as they are (the int8 method runs them)
        scale = state_dict[scale_key].float()
        scale = scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1)
        _check_values(scan, _stored_name(layer, "weight_scale"), scale)
        state_dict[scale_key] = scale
        if state_dict.pop(input_key, None) is not None:  # ComfyUI's int8 layers scale activations per row
            logger.warning("%s: %s: input_scale ignored (int8 activations are scaled per row)", scan.path, layer.name)
        return
    if not layer.is_fp8:
        if layer.weight_scale is not None:  # ComfyUI multiplies such weights by their scale: do it once here.
            scale = state_dict.pop(scale_key).float()
            _check_values(scan, scale_key, scale)
            weight = state_dict[weight_key]
            rows = weight.shape[0] if weight.dim() else 1
            if scale.numel() not in (1, rows) or weight.numel() == 0:
                raise CheckpointError(
                    f"{scan.path}: scale {_stored_name(layer, 'weight_scale')!r} of shape {list(scale.shape)} does "
                    f"not fit the {str(weight.dtype).removeprefix('torch.')} weight {weight_key!r} of shape "
                    f"{list(weight.shape)} (one value, or one per output row)"
                )
            state_dict[weight_key] = _scaled_values(weight, scale)
            state_dict.pop(input_key, None)
        return
    _check_fp8_values(scan, weight_key, state_dict[weight_key])
    if layer.weight_scale is None:  # plain fp8 cast
        state_dict[scale_key] = unit_weight_scale(state_dict[weight_key])
    if fmt == MXFP8:
        state_dict[scale_key], _ = decode_mx_scale(state_dict[scale_key], *layer.weight.shape)
    scale = state_dict[scale_key].float()
    if layer.weight_group is not None:
        scale = scale.reshape(weight_scale_shape(layer.weight_group, *state_dict[weight_key].shape))
    _check_values(scan, _stored_name(layer, "weight_scale"), scale)
    state_dict[scale_key] = scale
    if layer.input_scale is not None:
        input_scale = state_dict[input_key].float().reshape(())
        _check_values(scan, _stored_name(layer, "input_scale"), input_scale)
        state_dict[input_key] = input_scale


def _scaled_values(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A high-precision weight times its scale, in its own dtype; an integer weight (int8 values with a scale, a
    layout this pack reads by that rule) in float32: cast back, ``[-111, 76] x 0.01`` would become ``[-1, 0]``. The
    loader stores it in the dtype the model computes in, as any float weight."""
    values = weight.float() * _broadcastable(scale, weight)
    return values.to(weight.dtype) if weight.dtype.is_floating_point else values


def _check_fp8_values(scan: CheckpointScan, key: str, weight: torch.Tensor) -> None:
    """fp8 bytes that are NaN (e4m3fn 0x7F/0xFF; e5m2 NaN and inf) would sample a NaN latent without a word: two
    reductions over the weight's bytes, where they were loaded, no temporary (``count_fp8_non_finite``)."""
    bad = count_fp8_non_finite(weight)
    if bad:
        raise CheckpointError(
            f"{scan.path}: fp8 weight {key!r} holds {bad} NaN/inf value(s) ({str(weight.dtype).removeprefix('torch.')} "
            "bit patterns); the file is corrupt"
        )


def _stored_name(layer: LayerInfo, canonical: str) -> str:
    for stored in layer.scale_names:
        if SCALE_ALIASES.get(stored, stored) == canonical:
            return f"{layer.name}.{stored}"
    return f"{layer.name}.{canonical}"


def _broadcastable(scale: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1, *([1] * (weight.dim() - 1)))


def _check_values(scan: CheckpointScan, key: str, scale: torch.Tensor) -> None:
    try:
        check_scale(scale, f"{scan.path}: scale {key!r}")
    except ValueError as error:
        raise CheckpointError(str(error)) from None


__all__ = ["Fp8Checkpoint", "load_checkpoint", "read_layer_formats", "refuse_non_fp8_formats", "scan_checkpoint"]
