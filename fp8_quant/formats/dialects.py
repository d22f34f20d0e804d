"""Recognise a checkpoint's FP8 dialect from its header alone, layer by layer.

Dialects: ``weight-scale`` (vLLM, FastVideo, newer ComfyUI; DeepSeek-style ``weight_scale_inv`` per 128x128
block), ``comfy-scaled`` (ComfyUI's ``scale_weight``/``scale_input`` with the ``scaled_fp8`` marker),
``comfy-quant`` (per-layer ``.comfy_quant`` JSON or ``_quantization_metadata``; each layer's format, ``mxfp8``
included, is checked by the reader), ``plain-fp8`` (fp8 weights, no scales) and ``high-precision`` (nothing fp8:
quantize on the fly). A weight scale of block shape is recognised from its shape (``scheme.KNOWN_BLOCKS``).
Files mix fp8 layers with bf16/fp32 ones; those are kept as they are. An unknown
or inconsistent layout is an error, never a guess.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from ..choices import ActivationScheme
from ..config import Fp8Config
from ..fp8_utils import is_fp8_dtype
from ..scheme import MX_BLOCK, PER_TENSOR, PER_TOKEN, GroupShape, expected_scale_shapes, weight_group_of_scale
from .comfy_formats import INT8_TENSORWISE, MXFP8
from .header import CheckpointError, SafetensorsHeader, TensorInfo
from .safe_io import MAX_QUANT_METADATA_BYTES, loads_bounded

WEIGHT_SCALE = "weight-scale"
COMFY_SCALED = "comfy-scaled"
COMFY_QUANT = "comfy-quant"
PLAIN_FP8 = "plain-fp8"
HIGH_PRECISION = "high-precision"
DIALECTS = (WEIGHT_SCALE, COMFY_SCALED, COMFY_QUANT, PLAIN_FP8, HIGH_PRECISION)

# The one place where other scale names map to the canonical ones. DeepSeek and vLLM block-quantized files call
# the weight's scale ``weight_scale_inv`` (it multiplies the fp8 values, like every scale here).
COMFY_SCALED_NAMES = {"scale_weight": "weight_scale", "scale_input": "input_scale"}
SCALE_ALIASES = {**COMFY_SCALED_NAMES, "weight_scale_inv": "weight_scale"}
SCALE_NAMES = ("weight_scale", "input_scale", *SCALE_ALIASES)
COMFY_QUANT_SUFFIX = "comfy_quant"
SCALED_FP8_MARKER = "scaled_fp8"
QUANT_METADATA_KEY = "_quantization_metadata"
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
    quant_format: str | None = None  # a comfy-quant layer's declared format, once the reader has read it
    rotation_group: int | None = None  # an int8_tensorwise layer's ConvRot group (None: not rotated)

    @property
    def is_int8(self) -> bool:
        """A ComfyUI ``int8_tensorwise`` layer (known once the reader has read the layer's format)."""
        return self.quant_format == INT8_TENSORWISE

    @property
    def is_fp8(self) -> bool:
        return is_fp8_dtype(self.weight.dtype)

    @property
    def weight_group(self) -> GroupShape | None:
        """The granularity of the weight's scale (``None``: no scale); shapes were checked when the file was scanned."""
        if self.weight_scale is None:
            return None
        if self.quant_format == MXFP8:
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
    def nbytes(self) -> int:
        scales = (self.weight_scale, self.input_scale)
        return self.weight.nbytes + sum(scale.nbytes for scale in scales if scale is not None)


@dataclass
class CheckpointScan:
    """What the header says: the dialect, the key prefix, and every weight with its scales."""

    header: SafetensorsHeader
    dialect: str
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
    dialect = _dialect(layers, marker, metadata_layers)
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


def _dialect(layers: dict[str, LayerInfo], marker: TensorInfo | None, metadata_layers: dict | None) -> str:
    if metadata_layers is not None or any(layer.comfy_quant is not None for layer in layers.values()):
        return COMFY_QUANT
    old_names = any(name in COMFY_SCALED_NAMES for layer in layers.values() for name in layer.scale_names)
    if marker is not None or old_names:
        return COMFY_SCALED
    if any(layer.weight_scale is not None for layer in layers.values()):
        return WEIGHT_SCALE
    if any(layer.is_fp8 for layer in layers.values()):
        return PLAIN_FP8
    return HIGH_PRECISION


def _prefix(layers: dict[str, LayerInfo]) -> str:
    candidates = [layer for layer in layers.values() if layer.is_fp8] or list(layers.values())
    counts = Counter(next((p for p in KNOWN_PREFIXES if layer.name.startswith(p)), "") for layer in candidates)
    return counts.most_common(1)[0][0] if counts else ""


def _check_consistency(scan: CheckpointScan) -> None:
    path = scan.path
    needs_scale = scan.dialect in (WEIGHT_SCALE, COMFY_SCALED, COMFY_QUANT)
    for layer in scan.layers.values():
        if layer.is_fp8 and needs_scale and layer.weight_scale is None:
            raise CheckpointError(
                f"{path}: fp8 weight {layer.name + '.weight'!r} has no weight_scale, which the {scan.dialect} "
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
        if scan.dialect == COMFY_QUANT and layer.is_fp8 and layer.comfy_quant is None:
            if not scan.has_format_entry(layer):
                raise CheckpointError(
                    f"{path}: fp8 weight {layer.name + '.weight'!r} has neither a .comfy_quant entry nor a "
                    f"{QUANT_METADATA_KEY} entry"
                )
    if scan.dialect == COMFY_SCALED and scan.marker is not None:
        marker_dtype = scan.marker.dtype
        if is_fp8_dtype(marker_dtype):
            fp8_dtypes = {layer.weight.dtype for layer in scan.fp8_layers}
            if fp8_dtypes and fp8_dtypes != {marker_dtype}:
                found = sorted(map(str, fp8_dtypes))
                raise CheckpointError(f"{path}: scaled_fp8 marker says {marker_dtype} but the fp8 weights are {found}")
    if scan.dialect == PLAIN_FP8:
        scan.warnings.append("plain fp8 cast: no scales in the file, every weight scale is 1")
    statics = [layer for layer in scan.fp8_layers if layer.input_scale is not None]
    if statics and len(statics) != len(scan.fp8_layers):
        scan.warnings.append(
            f"{len(statics)} of {len(scan.fp8_layers)} fp8 layers carry an input scale; with activation_scheme "
            "auto those layers use it and the others learn theirs at the first step"
        )


def infer_config(scan: CheckpointScan) -> Fp8Config | None:
    """The config that loads this file as it is; ``None`` for a file with no fp8 weights."""
    fp8_layers = scan.fp8_layers
    if not fp8_layers:
        return None
    weight_dtype = Counter(layer.weight.dtype for layer in fp8_layers).most_common(1)[0][0]
    granularities = {layer.granularity for layer in fp8_layers}
    static = all(layer.input_scale is not None for layer in fp8_layers)
    # The stored layers' own scale shapes decide how each runs; this names the file's finest granularity.
    granularity = "tensor" if granularities <= {"tensor", None} else "channel"
    if any(layer.weight_group is not None and layer.weight_group.is_block() for layer in fp8_layers):
        granularity = "block"
    return Fp8Config(
        weight_dtype=weight_dtype,
        weight_granularity=granularity,
        activation_scheme=ActivationScheme.STATIC if static else ActivationScheme.DYNAMIC,
        activation_granularity=PER_TENSOR if static else PER_TOKEN,
    )
