"""Checkpoint dialects: how a whole file stores its fp8 layers, one object each, in one registry (``DIALECTS``).

A dialect is a file's format, read or written; ComfyUI's per-layer formats (``float8_e4m3fn``, ``mxfp8``,
``int8_tensorwise``, ... in a ``.comfy_quant`` entry) are *layer formats* (``comfy_formats``). Each dialect says:

- its name, how it is recognised from the header alone (``recognises``, tried by ``precedence``: the first that
  recognises a header is its dialect) and the other names its scales go by (``scale_aliases``: the reader brings
  them into the canonical state dict as ``weight_scale``/``input_scale``);
- what its layers must carry (``requires_weight_scale``), the rules it adds to the scan's checks (``check_layer``,
  ``check``) and whether its layers declare their layer format (``declares_layer_formats``: their scales are then
  checked per layer format, by the reader);
- the config that loads it as it is (``loading_config``);
- whether it is written (``written``; ``summary``: who reads such a file), and how: the names its scales get
  (``scale_keys``) and their shapes (``stored_scale_shape``), what an fp8 layer and a whole file carry beside their
  tensors (``layer_entries``, ``file_entries``), which weight granularities it holds exactly (``holds_group``), and
  whether it holds int8 layers and mixed fp8 dtypes.

The dialects: ``comfy-quant`` (per-layer ``.comfy_quant`` JSON or ``_quantization_metadata``, ``mxfp8`` and
``int8_tensorwise`` included), ``comfy-scaled`` (ComfyUI's ``scale_weight``/``scale_input`` with the
``scaled_fp8`` marker), ``weight-scale`` (vLLM, FastVideo, newer ComfyUI; DeepSeek-style ``weight_scale_inv`` per
128x128 block), ``plain-fp8`` (fp8 weights, no scales) and ``high-precision`` (nothing fp8: quantize on the fly).
Every dialect's aliases together are ``SCALE_ALIASES``. A dialect is its name wherever a string is expected
(messages, JSON, CLI choices, a widget's value), as a member of a str-Enum is, so files, workflows and reports
spell it as before.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import torch

from ..choices import ActivationScheme
from ..config import Fp8Config
from ..fp8_utils import is_fp8_dtype
from ..scheme import PER_TENSOR, PER_TOKEN, GroupShape
from .comfy_formats import FLOAT8_FORMATS
from .header import CheckpointError, TensorInfo
from .streaming import PlannedTensor, constant_bytes

if TYPE_CHECKING:
    from .scan import CheckpointScan, LayerInfo

CANONICAL_SCALE_NAMES = ("weight_scale", "input_scale")
COMFY_QUANT_SUFFIX = "comfy_quant"
SCALED_FP8_MARKER = "scaled_fp8"
QUANT_METADATA_KEY = "_quantization_metadata"
_LAYER_FORMAT_NAMES = {dtype: name for name, dtype in FLOAT8_FORMATS.items()}


class Dialect(str):
    """A checkpoint dialect: its name (the string value) and its rules; the defaults are those of a dialect of
    scaled fp8 layers that is only read."""

    name: ClassVar[str]
    precedence: ClassVar[int]  # recognition order: lower is tried first (the more specific layouts)
    summary: ClassVar[str] = ""  # a written dialect: who reads its files, in a few words (the CLI's --format help)
    requires_weight_scale: ClassVar[bool] = True
    quantized: ClassVar[bool] = True  # holds 8-bit layers (high-precision: quantized on the fly)
    declares_layer_formats: ClassVar[bool] = False
    written: ClassVar[bool] = False
    scale_aliases: ClassVar[Mapping[str, str]] = {}  # its other scale names -> the canonical ones (read as those)
    scale_suffixes: ClassVar[tuple[str, str]] = CANONICAL_SCALE_NAMES  # the weight's and input's, as written
    holds_int8: ClassVar[bool] = False
    holds_mixed_fp8_dtypes: ClassVar[bool] = True

    def __new__(cls) -> Dialect:
        return super().__new__(cls, cls.name)

    def __reduce__(self):  # copies and pickles are the registry's object again
        return dialect_named, (str(self),)

    # ---- reading ----------------------------------------------------------------------------------------------
    def recognises(
        self, layers: Mapping[str, LayerInfo], marker: TensorInfo | None, metadata_layers: Mapping | None
    ) -> bool:
        """Whether a header with these layers (their weights and scales), ``scaled_fp8`` marker and parsed
        ``_quantization_metadata`` layers is in this dialect (dialects of lower ``precedence`` were tried first)."""
        raise NotImplementedError

    def check_layer(self, scan: CheckpointScan, layer: LayerInfo) -> None:
        """This dialect's own rule for one layer, after the scan's common ones; a bad layer is a ``CheckpointError``
        naming the file and the tensor."""

    def check(self, scan: CheckpointScan) -> None:
        """This dialect's own rule for the whole file (errors, or warnings appended to ``scan.warnings``)."""

    def loading_config(self, scan: CheckpointScan) -> Fp8Config | None:
        """The config that loads this file as it is; ``None`` for a file with no fp8 weights. The stored layers' own
        scale shapes decide how each runs; this names the file's finest granularity."""
        fp8_layers = scan.fp8_layers
        if not fp8_layers:
            return None
        weight_dtype = Counter(layer.weight.dtype for layer in fp8_layers).most_common(1)[0][0]
        granularities = {layer.granularity for layer in fp8_layers}
        static = all(layer.input_scale is not None for layer in fp8_layers)
        granularity = "tensor" if granularities <= {"tensor", None} else "channel"
        if any(layer.weight_group is not None and layer.weight_group.is_block() for layer in fp8_layers):
            granularity = "block"
        return Fp8Config(
            weight_dtype=weight_dtype,
            weight_granularity=granularity,
            activation_scheme=ActivationScheme.STATIC if static else ActivationScheme.DYNAMIC,
            activation_granularity=PER_TENSOR if static else PER_TOKEN,
        )

    # ---- writing (``written`` dialects) -----------------------------------------------------------------------
    def scale_keys(self, layer: str) -> tuple[str, str]:
        """The keys of ``layer``'s weight scale and input scale in this dialect."""
        weight_scale, input_scale = self.scale_suffixes
        return f"{layer}.{weight_scale}", f"{layer}.{input_scale}"

    def holds_group(self, group: GroupShape) -> bool:
        """Whether a weight scale of ``group`` is written as it is (else the layer is re-quantized per tensor)."""
        return True

    def stored_scale_shape(self, scale_shape: tuple[int, ...], group: GroupShape) -> tuple[int, ...]:
        """The shape a weight scale of ``group`` is written in: per-channel scales as ``[N, 1]``, the shape vLLM
        and FastVideo files use; the others as they are."""
        return (*scale_shape, 1) if group.is_per_channel() else tuple(scale_shape)

    def layer_entries(self, layer: str, weight_dtype: torch.dtype) -> list[PlannedTensor]:
        """What an fp8 layer carries beside its weight and scales."""
        return []

    def file_entries(self, prefix: str, weight_dtype: torch.dtype) -> list[PlannedTensor]:
        """What a whole file carries beside its layers (keys get ``prefix``)."""
        return []


class ComfyQuant(Dialect):
    name = "comfy-quant"
    precedence = 0
    summary = "ComfyUI 0.16 and newer"
    declares_layer_formats = True
    written = True
    holds_int8 = True

    def recognises(self, layers, marker, metadata_layers) -> bool:
        return metadata_layers is not None or any(layer.comfy_quant is not None for layer in layers.values())

    def check_layer(self, scan, layer) -> None:
        if layer.is_fp8 and layer.comfy_quant is None and not scan.has_format_entry(layer):
            raise CheckpointError(
                f"{scan.path}: fp8 weight {layer.name + '.weight'!r} has neither a .comfy_quant entry nor a "
                f"{QUANT_METADATA_KEY} entry"
            )

    def holds_group(self, group: GroupShape) -> bool:
        return group.is_per_tensor()  # ComfyUI's fp8 layers read one scale per tensor

    def layer_entries(self, layer: str, weight_dtype: torch.dtype) -> list[PlannedTensor]:
        return [self.format_entry(layer, {"format": _LAYER_FORMAT_NAMES[weight_dtype]})]

    def format_entry(self, layer: str, entry: dict) -> PlannedTensor:
        """``layer``'s ``.comfy_quant`` tensor: its layer-format entry as JSON bytes."""
        payload = json.dumps(entry).encode()
        return PlannedTensor(f"{layer}.{COMFY_QUANT_SUFFIX}", torch.uint8, (len(payload),), constant_bytes(payload))


class ComfyScaled(Dialect):
    name = "comfy-scaled"
    precedence = 1
    summary = "every ComfyUI reads it"
    written = True
    scale_aliases: ClassVar[Mapping[str, str]] = {"scale_weight": "weight_scale", "scale_input": "input_scale"}
    scale_suffixes = ("scale_weight", "scale_input")
    holds_mixed_fp8_dtypes = False  # the marker names the one fp8 dtype

    def recognises(self, layers, marker, metadata_layers) -> bool:
        old_names = any(name in self.scale_aliases for layer in layers.values() for name in layer.scale_names)
        return marker is not None or old_names

    def check(self, scan) -> None:
        if scan.marker is None or not is_fp8_dtype(scan.marker.dtype):
            return
        marker_dtype = scan.marker.dtype
        fp8_dtypes = {layer.weight.dtype for layer in scan.fp8_layers}
        if fp8_dtypes and fp8_dtypes != {marker_dtype}:
            found = sorted(map(str, fp8_dtypes))
            raise CheckpointError(f"{scan.path}: scaled_fp8 marker says {marker_dtype} but the fp8 weights are {found}")

    def holds_group(self, group: GroupShape) -> bool:
        return group.is_per_tensor()  # ComfyUI's fp8 layers read one scale per tensor

    def file_entries(self, prefix: str, weight_dtype: torch.dtype) -> list[PlannedTensor]:
        def empty() -> torch.Tensor:
            return torch.empty(0, dtype=weight_dtype)

        return [PlannedTensor(prefix + SCALED_FP8_MARKER, weight_dtype, (0,), empty)]


class WeightScale(Dialect):
    name = "weight-scale"
    precedence = 2
    summary = "every scale as it is, for Load FP8 DiT"
    written = True
    # DeepSeek and vLLM block-quantized files call the weight's scale ``weight_scale_inv`` (it multiplies the fp8
    # values, like every scale here).
    scale_aliases: ClassVar[Mapping[str, str]] = {"weight_scale_inv": "weight_scale"}

    def recognises(self, layers, marker, metadata_layers) -> bool:
        return any(layer.weight_scale is not None for layer in layers.values())


class PlainFp8(Dialect):
    name = "plain-fp8"
    precedence = 3
    requires_weight_scale = False

    def recognises(self, layers, marker, metadata_layers) -> bool:
        return any(layer.is_fp8 for layer in layers.values())

    def check(self, scan) -> None:
        scan.warnings.append("plain fp8 cast: no scales in the file, every weight scale is 1")


class HighPrecision(Dialect):
    name = "high-precision"
    precedence = 4
    requires_weight_scale = False
    quantized = False

    def recognises(self, layers, marker, metadata_layers) -> bool:
        return True  # the fallback: nothing fp8


COMFY_QUANT = ComfyQuant()
COMFY_SCALED = ComfyScaled()
WEIGHT_SCALE = WeightScale()
PLAIN_FP8 = PlainFp8()
HIGH_PRECISION = HighPrecision()
# The registry, in the order files are written and offered (the CLI's --format, Save FP8 Model's widget).
DIALECTS: tuple[Dialect, ...] = (COMFY_SCALED, COMFY_QUANT, WEIGHT_SCALE, PLAIN_FP8, HIGH_PRECISION)
OUTPUT_DIALECTS: tuple[Dialect, ...] = tuple(dialect for dialect in DIALECTS if dialect.written)
OUTPUT_FORMATS: tuple[str, ...] = tuple(str(dialect) for dialect in OUTPUT_DIALECTS)
# Every other scale name any dialect reads, mapped to the canonical one (the header scan collects scales by these
# names before the dialect is known).
SCALE_ALIASES: dict[str, str] = {alias: name for dialect in DIALECTS for alias, name in dialect.scale_aliases.items()}
SCALE_NAMES: tuple[str, ...] = (*CANONICAL_SCALE_NAMES, *SCALE_ALIASES)
# What a file is written in unless the caller says otherwise: the dialect every ComfyUI reads.
DEFAULT_OUTPUT_FORMAT: Dialect = COMFY_SCALED


def dialect_named(name: str) -> Dialect:
    """The registry's dialect of that name; anything else is a ``ValueError``."""
    for dialect in DIALECTS:
        if dialect == name:
            return dialect
    raise ValueError(f"dialect: {name!r} is not allowed; allowed values: {[str(d) for d in DIALECTS]}")


def output_dialect(name: str) -> Dialect:
    """The written dialect called ``name`` (the ``output_format`` of a writer); any other is a ``ValueError``."""
    for dialect in OUTPUT_DIALECTS:
        if dialect == name:
            return dialect
    raise ValueError(f"output_format: {name!r} is not allowed; allowed values: {list(OUTPUT_FORMATS)}")


def recognise(
    layers: Mapping[str, LayerInfo], marker: TensorInfo | None, metadata_layers: Mapping | None
) -> Dialect:
    """The dialect of a header: the first, by precedence, that recognises it."""
    for dialect in sorted(DIALECTS, key=lambda dialect: dialect.precedence):
        if dialect.recognises(layers, marker, metadata_layers):
            return dialect
    raise AssertionError("high-precision recognises every header")


def written_by(predicate) -> str:
    """The written dialects for which ``predicate`` holds, as a message names them ("comfy-quant")."""
    return " or ".join(str(dialect) for dialect in OUTPUT_DIALECTS if predicate(dialect))
