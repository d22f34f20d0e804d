"""Names for quantization schemes ("fp8 e4m3, per-token, dynamic") and the one rule for scale shapes.

Methods and kernels talk about schemes, not about loose flags: a kernel says which ``QuantKey`` pairs it can
multiply, a config says which keys it wants. Modelled on vLLM's ``quant_utils`` descriptors, reduced to what
FP8 linears need.

Axis convention (vLLM's): a ``GroupShape`` describes an operand **as it enters the matrix product**
``out[M, N] = A[M, K] @ B[K, N]``. For the activation ``A``, rows are tokens; for the weight ``B = W.T``,
columns are output channels. So one scale per token is ``(1, -1)`` and one scale per output channel is
``(-1, 1)``; a 128x128 weight block is ``(128, 128)`` and a 1x128 activation group ``(1, 128)``. A weight block
may be one output channel wide: ``(128, 1)`` is one scale per output channel and 128 inputs (DeepSeek's "1x128"
for a weight row), ``(32, 1)`` the layout of ``mxfp8``. Weights are *stored* as ``nn.Linear`` holds them,
``W[N, K]``, and their scales in the transposed order of the groups: ``[]`` per tensor, ``[N]`` per channel,
``[ceil(N/bn), ceil(K/bk)]`` per block (the layout of DeepSeek/vLLM ``weight_scale_inv`` files).
``weight_scale_shape`` and ``weight_group_of_scale`` are that rule, written once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch


class GroupShape(NamedTuple):
    """How many elements of a GEMM operand share one scale, along its rows and columns; -1: the whole extent."""

    row: int
    col: int

    def is_per_tensor(self) -> bool:
        return self.row == -1 and self.col == -1

    def is_per_token(self) -> bool:
        return self.row == 1 and self.col == -1

    def is_per_channel(self) -> bool:
        return self.row == -1 and self.col == 1

    def is_per_group(self) -> bool:
        """1 x g activation groups (one scale per token per g input channels)."""
        return self.row == 1 and self.col > 1

    def is_block(self) -> bool:
        """Weight blocks of ``row`` inputs x ``col`` output channels: 128x128 in DeepSeek-style checkpoints, 128x1
        (one output channel, 128 inputs) and 32x1 (``mxfp8``) along the rows of ``W[N, K]``."""
        return self.row > 1 and self.col >= 1

    def describe(self) -> str:
        if self.is_per_tensor():
            return "per-tensor"
        if self.is_per_token():
            return "per-token"
        if self.is_per_channel():
            return "per-channel"
        if self.is_block() and self.col == 1:
            return f"groups of {self.row} per channel"
        return f"{'block' if self.is_block() else 'group'} {self.row}x{self.col}"


PER_TENSOR = GroupShape(-1, -1)
PER_TOKEN = GroupShape(1, -1)
PER_CHANNEL = GroupShape(-1, 1)
BLOCK_128 = GroupShape(128, 128)
GROUP_128 = GroupShape(128, 1)  # a weight row in groups of 128 inputs
MX_BLOCK = GroupShape(32, 1)  # mxfp8: a weight row in groups of 32 inputs, power-of-two scales
PER_TOKEN_GROUP_128 = GroupShape(1, 128)  # an activation row in groups of 128 (what block-scaled GEMMs take)
# Block shapes recognised from a stored scale's shape (first match wins; see weight_group_of_scale).
KNOWN_BLOCKS: tuple[GroupShape, ...] = (BLOCK_128, GROUP_128, MX_BLOCK)


def weight_scale_shape(group: GroupShape, out_features: int, in_features: int) -> tuple[int, ...]:
    """The stored scale shape of a weight ``W[N, K]`` quantized with ``group`` (see the module docstring)."""
    if group.is_per_tensor():
        return ()
    if group.is_per_channel():
        return (out_features,)
    if group.is_block():
        return (math.ceil(out_features / group.col), math.ceil(in_features / group.row))
    raise ValueError(f"{group.describe()} is not a weight granularity")


def weight_group_of_scale(
    shape: tuple[int, ...], out_features: int, in_features: int, blocks: tuple[GroupShape, ...] = KNOWN_BLOCKS
) -> GroupShape | None:
    """The granularity a stored weight scale of ``shape`` stands for, or ``None`` if it fits none.

    Checkpoints write a per-tensor scale as ``[]`` or ``[1]`` and a per-channel one as ``[N]`` or ``[N, 1]``; a
    2-D scale of ``[ceil(N/bn), ceil(K/bk)]`` is a block scale of the first of ``blocks`` it fits. Where two
    readings coincide (a weight of at most one block) they mean the same scales, so the first is as good.
    """
    if math.prod(shape) == 1 and len(shape) <= 2:
        return PER_TENSOR
    if tuple(shape) in ((out_features,), (out_features, 1)):
        return PER_CHANNEL
    if len(shape) == 2:
        for block in blocks:
            if tuple(shape) == weight_scale_shape(block, out_features, in_features):
                return block
    return None


def expected_scale_shapes(out_features: int, in_features: int) -> str:
    """The scale shapes a weight ``[N, K]`` may carry, for error messages."""
    shapes = ["[]", "[1]", f"[{out_features}]", f"[{out_features}, 1]"]
    shapes += [
        f"{list(weight_scale_shape(block, out_features, in_features))} ({block.describe()})" for block in KNOWN_BLOCKS
    ]
    return ", ".join(shapes)


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

    def __post_init__(self) -> None:
        # Hashed once: a layer's kernels are looked up by scheme at every forward.
        object.__setattr__(self, "_hash", hash((self.dtype, self.scale, self.symmetric, self.is_weight)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self):  # rebuilt, not restored: a dtype's hash differs between processes
        return (type(self), (self.dtype, self.scale, self.symmetric, self.is_weight))

    @property
    def group_shape(self) -> GroupShape:
        return self.scale.group_shape

    @property
    def per_tensor(self) -> bool:
        return self.scale.group_shape.is_per_tensor()

    def __str__(self) -> str:
        dtype_name = {torch.float8_e4m3fn: "fp8 e4m3", torch.float8_e5m2: "fp8 e5m2"}.get(self.dtype, str(self.dtype))
        grouping = self.scale.group_shape.describe()
        if self.is_weight:
            if self.scale.group_shape == MX_BLOCK:  # power-of-two scales of 32 inputs: a format of its own
                return f"mxfp8 ({dtype_name}, {grouping}, power-of-two scales)"
            return f"{dtype_name}, {grouping}"
        kind = "static" if self.scale.static else "dynamic"
        return f"{dtype_name}, {grouping}, {kind}"


def weight_key(dtype: torch.dtype, group: GroupShape) -> QuantKey:
    """Weights are always statically scaled (the scale is computed once, at load)."""
    return QuantKey(dtype, ScaleDesc(torch.float32, True, group), is_weight=True)


def activation_key(dtype: torch.dtype, static: bool, group: GroupShape) -> QuantKey:
    return QuantKey(dtype, ScaleDesc(torch.float32, static, group))


kFp8StaticTensorSym = activation_key(torch.float8_e4m3fn, static=True, group=PER_TENSOR)
kFp8DynamicTensorSym = activation_key(torch.float8_e4m3fn, static=False, group=PER_TENSOR)
kFp8DynamicTokenSym = activation_key(torch.float8_e4m3fn, static=False, group=PER_TOKEN)
kFp8WeightTensor = weight_key(torch.float8_e4m3fn, PER_TENSOR)
kFp8WeightChannel = weight_key(torch.float8_e4m3fn, PER_CHANNEL)
