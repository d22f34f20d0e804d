"""Names for quantization schemes ("fp8 e4m3, per-token, dynamic").

Methods and kernels talk about schemes, not about loose flags: a kernel says which
``QuantKey`` pairs it can multiply, a config says which keys it wants. Modelled on
vLLM's ``quant_utils`` descriptors, reduced to what FP8 linears need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


class GroupShape(NamedTuple):
    """How many elements share one scale, along rows and columns; -1 means the whole extent.

    For an activation [M, K], rows are tokens. For a weight [N, K], rows are output channels.
    """

    row: int
    col: int

    def describe(self) -> str:
        if self == PER_TENSOR:
            return "per-tensor"
        if self == PER_TOKEN:
            return "per-token"
        return f"group {self.row}x{self.col}"


PER_TENSOR = GroupShape(-1, -1)
PER_TOKEN = GroupShape(1, -1)
# One scale per output channel of a weight [N, K]: the same shape as per-token, named for readability.
PER_CHANNEL = PER_TOKEN


@dataclass(frozen=True)
class ScaleDesc:
    """What a scale looks like: its dtype, whether it is fixed ahead of time, and its grouping."""

    dtype: torch.dtype
    static: bool
    group_shape: GroupShape


@dataclass(frozen=True)
class QuantKey:
    """A full quantization scheme for one operand: storage dtype plus scale description."""

    dtype: torch.dtype
    scale: ScaleDesc
    symmetric: bool = True
    is_weight: bool = False

    @property
    def per_tensor(self) -> bool:
        return self.scale.group_shape == PER_TENSOR

    def __str__(self) -> str:
        dtype_name = {torch.float8_e4m3fn: "fp8 e4m3", torch.float8_e5m2: "fp8 e5m2"}.get(self.dtype, str(self.dtype))
        grouping = self.scale.group_shape.describe()
        if self.is_weight and self.scale.group_shape == PER_CHANNEL:
            grouping = "per-channel"
        if self.is_weight:
            return f"{dtype_name}, {grouping}"
        kind = "static" if self.scale.static else "dynamic"
        return f"{dtype_name}, {grouping}, {kind}"


def weight_key(dtype: torch.dtype, per_channel: bool) -> QuantKey:
    """Weights are always statically scaled (the scale is computed once, at load)."""
    group = PER_CHANNEL if per_channel else PER_TENSOR
    return QuantKey(dtype, ScaleDesc(torch.float32, True, group), is_weight=True)


def activation_key(dtype: torch.dtype, static: bool, per_token: bool) -> QuantKey:
    group = PER_TOKEN if per_token else PER_TENSOR
    return QuantKey(dtype, ScaleDesc(torch.float32, static, group))


kFp8StaticTensorSym = activation_key(torch.float8_e4m3fn, static=True, per_token=False)
kFp8DynamicTensorSym = activation_key(torch.float8_e4m3fn, static=False, per_token=False)
kFp8DynamicTokenSym = activation_key(torch.float8_e4m3fn, static=False, per_token=True)
kFp8WeightTensor = weight_key(torch.float8_e4m3fn, per_channel=False)
kFp8WeightChannel = weight_key(torch.float8_e4m3fn, per_channel=True)
