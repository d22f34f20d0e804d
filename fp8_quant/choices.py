"""The one table between the names people and files write and the typed values the core works with.

A node widget, a CLI flag, a checkpoint's metadata and a config dict all name a choice by a string; each string is
parsed here, once, at that edge (``Choice.parse``), and written back here (``Choice.format``). Inside the core a
choice is an enum member, a ``GroupShape`` or a dtype, never a string compared again. A bad value is one
``ValueError`` line naming the option and the allowed values.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from .scheme import BLOCK_128, PER_CHANNEL, PER_TENSOR, PER_TOKEN, PER_TOKEN_GROUP_128, GroupShape

T = TypeVar("T")
AUTO = "auto"  # "the file's own, or the default": resolved by ``config.resolve``, never past it


class ActivationScheme(str, enum.Enum):
    """How a layer's activations are scaled. ``dynamic``: a scale per call; ``static``: one per-tensor scale, the
    checkpoint's ``input_scale`` or else one learnt at run time; ``calibrated``: learnt per layer at run time,
    static per-tensor or dynamic per-token (``auto_scales``); ``none``: kept in high precision (weight-only)."""

    DYNAMIC = "dynamic"
    STATIC = "static"
    CALIBRATED = "calibrated"
    NONE = "none"

    @property
    def quantizes(self) -> bool:
        return self is not ActivationScheme.NONE

    @property
    def learns_scales(self) -> bool:
        """Scales found while the model runs (where a layer has no ``input_scale`` from its file)."""
        return self in (ActivationScheme.STATIC, ActivationScheme.CALIBRATED)

    @property
    def user_choice(self) -> bool:
        """Whether a person picks it by name; ``calibrated`` is what ``auto`` stands for (a config may name it)."""
        return self is not ActivationScheme.CALIBRATED

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Choice(Generic[T]):
    """One option: its name as users see it, its allowed names with the typed value each stands for, and other
    spellings accepted for them (``aliases``, not listed in errors)."""

    option: str
    values: Mapping[str, T]
    aliases: Mapping[str, str] = field(default_factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.values)

    def parse(self, value: Any, option: str | None = None, shown: Any = None) -> T:
        """The typed value of ``value`` (a name, an alias, or already a typed value); else the error naming
        ``option`` (default: this option's own name) and ``shown`` (default: ``value``), what the user wrote."""
        for typed in self.values.values():
            if value is typed or (value == typed and type(value) is type(typed)):
                return typed
        if isinstance(value, str):
            name = self.aliases.get(value, value)
            if name in self.values:
                return self.values[name]
        written = value if shown is None else shown
        raise ValueError(f"{option or self.option}: {written!r} is not allowed; allowed values: {list(self.names)}")

    def format(self, typed: T) -> str:
        """The name of a typed value, as files and widgets write it."""
        for name, candidate in self.values.items():
            if candidate is typed or (candidate == typed and type(candidate) is type(typed)):
                return name
        raise ValueError(f"{self.option}: {typed!r} has no name; allowed values: {list(self.names)}")


class QuantFormat(enum.Enum):
    """The 8-bit number format of a model's quantized linears, as users name it (``QUANT_FORMAT``)."""

    AUTO = "auto"  # per GPU (``format_choice.resolve_quant_format``); fp8 where no device is known
    FP8 = "fp8"
    INT8_ROTATED = "int8_rotated"


class CudaGraphs(enum.Enum):
    """Whether a diffusion model's steps may replay as CUDA graphs (``step_graphs``): ``auto`` where it is safe."""

    AUTO = "auto"
    OFF = "off"


_DTYPE_ALIASES = {
    "e4m3fn": "float8_e4m3fn",
    "e4m3": "float8_e4m3fn",
    "fp8_e4m3fn": "float8_e4m3fn",
    "e5m2": "float8_e5m2",
    "fp8_e5m2": "float8_e5m2",
}

WEIGHT_DTYPE = Choice("weight_dtype", {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2},
                      _DTYPE_ALIASES)  # fmt: skip
OUTPUT_DTYPE = Choice(
    "output_dtype",
    {AUTO: None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32},
    {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"},
)
ACTIVATION_SCHEME = Choice("activation_scheme", {scheme.value: scheme for scheme in ActivationScheme})
QUANT_FORMAT = Choice(
    "quant_format", {fmt.value: fmt for fmt in QuantFormat}, {"int8": "int8_rotated", "int8_convrot": "int8_rotated"}
)
class Int8ActivationScales(enum.Enum):
    """How int8 activations are scaled: one scale per row (token), as ComfyUI's ``int8_tensorwise`` does; or one per
    row and rotation group, with the weights one per output channel and group (finer steps; no ComfyUI file form)."""

    TOKEN = "token"
    GROUP = "group"


INT8_WEIGHT_GRANULARITY = Choice("weight_granularity", {"channel": PER_CHANNEL, "tensor": PER_TENSOR})
INT8_ACTIVATION_SCHEME = Choice(
    "activation_scheme", {"dynamic": ActivationScheme.DYNAMIC, "none": ActivationScheme.NONE}
)
INT8_ACTIVATION_GRANULARITY = Choice(
    "activation_granularity", {scales.value: scales for scales in Int8ActivationScales}
)
CUDA_GRAPHS = Choice("cuda_graphs", {choice.value: choice for choice in CudaGraphs}, {"on": "auto"})
# Granularity names as users write them, and the GroupShape each stands for (see scheme.py for the axes).
# "block": DeepSeek-style 128x128 weight blocks; "group": 1x128 activation groups (what block-scaled GEMMs take).
WEIGHT_GRANULARITY = Choice("weight_granularity", {"channel": PER_CHANNEL, "tensor": PER_TENSOR, "block": BLOCK_128})
ACTIVATION_GRANULARITY = Choice(
    "activation_granularity", {"tensor": PER_TENSOR, "token": PER_TOKEN, "group": PER_TOKEN_GROUP_128}
)
# A config's weight granularity: ``None`` for auto (chosen per layer at load, ``auto_scales.choose_weight_group``).
WEIGHT_GRANULARITY_OR_AUTO: Choice[GroupShape | None] = Choice(
    "weight_granularity", {AUTO: None, **WEIGHT_GRANULARITY.values}
)

# What a person may pick by name (widgets, CLI), ``auto`` first: the choices' own names, nothing restated.
USER_ACTIVATION_SCHEMES = (AUTO, *(scheme.value for scheme in ActivationScheme if scheme.user_choice))
USER_ACTIVATION_GRANULARITIES = (AUTO, *ACTIVATION_GRANULARITY.names)
WEIGHT_GRANULARITIES = (AUTO, *WEIGHT_GRANULARITY.names)


__all__ = [
    "ACTIVATION_GRANULARITY",
    "ACTIVATION_SCHEME",
    "AUTO",
    "CUDA_GRAPHS",
    "INT8_ACTIVATION_GRANULARITY",
    "INT8_ACTIVATION_SCHEME",
    "INT8_WEIGHT_GRANULARITY",
    "OUTPUT_DTYPE",
    "QUANT_FORMAT",
    "USER_ACTIVATION_GRANULARITIES",
    "USER_ACTIVATION_SCHEMES",
    "WEIGHT_DTYPE",
    "WEIGHT_GRANULARITIES",
    "WEIGHT_GRANULARITY",
    "WEIGHT_GRANULARITY_OR_AUTO",
    "ActivationScheme",
    "Choice",
    "CudaGraphs",
    "Int8ActivationScales",
    "QuantFormat",
]
