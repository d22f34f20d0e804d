"""The header scan: every ``<layer>.weight`` with the scale tensors that belong to it, the key prefix and the
file's dialect (``dialects.recognise``), from the header alone; scale shapes and the dialect's rules checked.

Files mix fp8 layers with bf16/fp32 ones; those are kept as they are. A weight scale of block shape is recognised
from its shape (``scheme.KNOWN_BLOCKS``). An unknown or inconsistent layout is an error, never a guess.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from ..config import Fp8Config
from ..fp8_utils import is_fp8_dtype
from ..scheme import MX_BLOCK, PER_TENSOR, GroupShape, expected_scale_shapes, weight_group_of_scale, weight_key
from .comfy_formats import INT8_TENSORWISE, MXFP8, NAMED_LAYER_FORMATS
from .dialects import (
    COMFY_QUANT_SUFFIX,
    QUANT_METADATA_KEY,
    SCALE_ALIASES,
    SCALE_NAMES,
    SCALED_FP8_MARKER,
    Dialect,
    recognise,
)
from .header import CheckpointError, SafetensorsHeader, TensorInfo
from .safe_io import MAX_QUANT_METADATA_BYTES, loads_bounded

KNOWN_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


@dataclass
class LayerInfo:
    """One ``<layer>.weight`` and the scale tensors that belong to it, as named in the file."""

    name: str
    weight: TensorInfo
    weight_scale: TensorInfo | None = None
    input_scale: TensorInfo | None = None
    comfy_quant: TensorInfo | None = None
    scale_names: tuple[str, ...] = ()
    layer_format: str | None = None  # a comfy-quant layer's declared layer format, once the reader has read it
    rotation_group: int | None = None  # an int8_tensorwise layer's ConvRot group (None: not rotated)

    @property
    def is_int8(self) -> bool:
        """A ComfyUI ``int8_tensorwise`` layer (known once the reader has read the layer's format)."""
        return self.layer_format == INT8_TENSORWISE

    @property
    def is_fp8(self) -> bool:
        return is_fp8_dtype(self.weight.dtype)

    @property
    def weight_group(self) -> GroupShape | None:
        """The granularity of the weight's scale (``None``: no scale); shapes were checked when the file was scanned."""
        if self.weight_scale is None:
            return None
        if self.layer_format == MXFP8:
            return MX_BLOCK
        return weight_group_of_scale(self.weight_scale.shape, *_out_in(self.weight))

    @property
    def granularity(self) -> str | None:
        """"tensor", "channel" or the block's description, as configs and reports name it."""
        group = self.weight_group
        if group is None:
            return None
        return "tensor" if group.is_per_tensor() else "channel" if group.is_per_channel() else group.describe()

    @property
    def scheme(self) -> str | None:
        """How an fp8 layer's weight is stored, in words: the fp8 dtype and its scales' granularity ("fp8 e4m3,
        per-tensor"; a plain cast is per tensor at scale 1), after the layer format where that says more
        (``mxfp8``: power-of-two e8m0 scales); ``None``: not an fp8 layer."""
        if not self.is_fp8:
            return None
        stored = str(weight_key(self.weight.dtype, self.weight_group or PER_TENSOR))
        named = self.layer_format in NAMED_LAYER_FORMATS and not stored.startswith(f"{self.layer_format} ")
        return f"{self.layer_format} ({stored})" if named else stored

    @property
    def nbytes(self) -> int:
        scales = (self.weight_scale, self.input_scale)
        return self.weight.nbytes + sum(scale.nbytes for scale in scales if scale is not None)


@dataclass
class CheckpointScan:
    """What the header says: the dialect, the key prefix, and every weight with its scales."""

    header: SafetensorsHeader
    dialect: Dialect
    prefix: str
    layers: dict[str, LayerInfo]
    marker: TensorInfo | None = None
    quant_metadata: dict[str, object] | None = None  # the parsed ``layers`` of _quantization_metadata
    warnings: list[str] = field(default_factory=list)

    @property
    def path(self):
        return self.header.path

    @property
    def fp8_layers(self) -> list[LayerInfo]:
        return [layer for layer in self.layers.values() if layer.is_fp8]

    @property
    def int8_layers(self) -> list[LayerInfo]:
        """ComfyUI ``int8_tensorwise`` layers (once the reader has read the formats)."""
        return [layer for layer in self.layers.values() if layer.is_int8]

    def weight_schemes(self) -> dict[str, int]:
        """How many fp8 layers store their weight each way (``LayerInfo.scheme``): an mxfp8 file says mxfp8 (once the
        reader has read the layer formats, as ``load_checkpoint`` and ``inspect`` do)."""
        return dict(Counter(layer.scheme for layer in self.fp8_layers))

    def short_name(self, layer_name: str) -> str:
        """The layer name without the file's key prefix (what skip patterns and models use)."""
        return layer_name[len(self.prefix) :] if layer_name.startswith(self.prefix) else layer_name

    def has_format_entry(self, layer: LayerInfo) -> bool:
        """Whether a comfy-quant layer declares its format (a ``.comfy_quant`` tensor or a metadata entry)."""
        if layer.comfy_quant is not None:
            return True
        listed = self.quant_metadata or {}
        return layer.name in listed or self.short_name(layer.name) in listed


def scan_header(header: SafetensorsHeader) -> CheckpointScan:
    path = header.path
    tensors = header.tensors
    layers: dict[str, LayerInfo] = {}
    for key, info in tensors.items():
        if key.endswith(".weight"):
            layers[key[: -len(".weight")]] = LayerInfo(key[: -len(".weight")], info)
    marker = None
    scales: list[tuple[str, TensorInfo, LayerInfo, str]] = []
    for key, info in tensors.items():
        if key.endswith(".weight"):
            continue
        layer_name, _, suffix = key.rpartition(".")
        if key == SCALED_FP8_MARKER or key.endswith("." + SCALED_FP8_MARKER):
            marker = info
            continue
        if suffix not in SCALE_NAMES and suffix != COMFY_QUANT_SUFFIX:
            continue
        layer = layers.get(layer_name)
        if layer is None:
            raise CheckpointError(f"{path}: {key!r} has no matching weight {layer_name + '.weight'!r}")
        if suffix == COMFY_QUANT_SUFFIX:
            layer.comfy_quant = info
            continue
        canonical = SCALE_ALIASES.get(suffix, suffix)
        if getattr(layer, canonical) is not None:
            raise CheckpointError(f"{path}: layer {layer_name!r} has both {canonical} and its other name {suffix}")
        setattr(layer, canonical, info)
        layer.scale_names += (suffix,)
        scales.append((key, info, layer, canonical))
    metadata_layers = _metadata_layers(header)
    dialect = recognise(layers, marker, metadata_layers)
    scan = CheckpointScan(header, dialect, _prefix(layers), layers, marker, metadata_layers)
    for key, info, layer, canonical in scales:
        if not scan.has_format_entry(layer):  # a declared format's scales are checked by the reader, per format
            check_scale_shape(path, key, info, layer.weight, canonical)
    _check_consistency(scan)
    return scan


def check_scale_shape(path, key: str, info: TensorInfo, weight: TensorInfo, canonical: str) -> None:
    """A float scale of a shape that fits the weight (an input scale: one scalar); else a ``CheckpointError``."""
    if info.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise CheckpointError(f"{path}: {key!r} has dtype {info.dtype}; scales are float32 (or bf16/fp16)")
    if canonical == "input_scale":
        if info.numel != 1:
            raise CheckpointError(f"{path}: {key!r} has shape {list(info.shape)}; an input scale is one scalar")
        return
    if weight_group_of_scale(info.shape, *_out_in(weight)) is not None:
        return
    raise CheckpointError(
        f"{path}: {key!r} has shape {list(info.shape)}, which fits no granularity for weight "
        f"{list(weight.shape)} (expected {expected_scale_shapes(*_out_in(weight))})"
    )


def _out_in(weight: TensorInfo) -> tuple[int, int]:
    shape = weight.shape
    return (shape[0] if shape else 0, shape[1] if len(shape) > 1 else 1)


def _metadata_layers(header: SafetensorsHeader) -> dict[str, object] | None:
    raw = header.metadata.get(QUANT_METADATA_KEY)
    if raw is None:
        return None
    parsed = loads_bounded(raw, f"{header.path}: metadata {QUANT_METADATA_KEY}", MAX_QUANT_METADATA_BYTES)
    if not isinstance(parsed, dict) or not isinstance(parsed.get("layers"), dict):
        raise CheckpointError(f"{header.path}: metadata {QUANT_METADATA_KEY} must be an object with a 'layers' object")
    return parsed["layers"]


def _prefix(layers: dict[str, LayerInfo]) -> str:
    candidates = [layer for layer in layers.values() if layer.is_fp8] or list(layers.values())
    counts = Counter(next((p for p in KNOWN_PREFIXES if layer.name.startswith(p)), "") for layer in candidates)
    return counts.most_common(1)[0][0] if counts else ""


def _check_consistency(scan: CheckpointScan) -> None:
    """The rules every dialect shares, each layer's own rule of its dialect, then the dialect's rule for the file."""
    path, dialect = scan.path, scan.dialect
    for layer in scan.layers.values():
        if layer.is_fp8 and dialect.requires_weight_scale and layer.weight_scale is None:
            raise CheckpointError(
                f"{path}: fp8 weight {layer.name + '.weight'!r} has no weight_scale, which the {dialect} "
                "dialect requires"
            )
        if layer.is_fp8 and len(layer.weight.shape) != 2:
            raise CheckpointError(
                f"{path}: fp8 weight {layer.name + '.weight'!r} is not 2-D: {list(layer.weight.shape)}"
            )
        if not layer.is_fp8 and layer.weight_scale is not None and not scan.has_format_entry(layer):
            scan.warnings.append(
                f"{layer.name}: {layer.weight.dtype} weight carries a scale; it is applied at load, as ComfyUI does"
            )
        dialect.check_layer(scan, layer)
    dialect.check(scan)
    statics = [layer for layer in scan.fp8_layers if layer.input_scale is not None]
    if statics and len(statics) != len(scan.fp8_layers):
        scan.warnings.append(
            f"{len(statics)} of {len(scan.fp8_layers)} fp8 layers carry an input scale; with activation_scheme "
            "auto those layers use it and the others learn theirs at the first step"
        )


def infer_config(scan: CheckpointScan) -> Fp8Config | None:
    """The config that loads this file as it is (its dialect's ``loading_config``); ``None`` for a file with no fp8
    weights."""
    return scan.dialect.loading_config(scan)
