"""int8 linear kernels: ``torch._int_mm`` on the GPU's integer tensor cores, and a dequantize fallback.

Both keep the numerics of ``quant_int8``: activations rotated as the weight was (where it was) and rounded to int8
with one scale per row at every call, an exact int32 product, then ``out = acc * row_scale * column_scale + bias``
in float32, cast once to the output dtype. The fallback (CPUs, GPUs without int8 tensor cores, shapes
``_int_mm`` refuses) multiplies the same int8 values in float32, so a CPU reports what the GPU computes, up to
float32 summation order. A weight-only layer (activations kept in high precision) runs on the fallback only.

``torch._int_mm(a [M, K], b [K, N])`` on CUDA wants ``M > 16`` and ``K``, ``N`` multiples of 8; ``K`` and ``N``
are known per layer (``can_implement`` says why not), ``M`` only per call, so a call of at most 16 rows is padded
with zero rows (what comfy-kitchen does too; it costs a copy of a few rows).
"""

from __future__ import annotations

import functools
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..params import Fp8LinearParams
from ..prepared import Product, general_product
from ..quant_int8 import dequantize_int8_weight, quantize_int8_rows, rotated, spread_group_scale
from ..scheme import PER_TOKEN, GroupShape, QuantKey, activation_key
from .base import _FLOAT_DTYPES, WEIGHT_ONLY_REASON

kInt8DynamicTokenSym = activation_key(torch.int8, static=False, group=PER_TOKEN)
INT_MM_MIN_ROWS = 17  # CUDA _int_mm wants more than 16 rows
INT_MM_PADDED_ROWS = 32


@dataclass(frozen=True)
class Int8LinearLayerConfig:
    """What an int8 kernel needs to know about one layer. ``rotation_group``: the inputs are rotated in groups of
    this many (``rotation``) before rounding, or ``None``. ``scale_group``: activations and weights have one scale
    per row and per this many inputs (``quant_int8``), or ``None`` (one per row and one per output channel)."""

    weight_quant_key: QuantKey
    in_features: int
    out_features: int
    rotation_group: int | None = None
    quantizes_activations: bool = True
    out_dtype: torch.dtype | None = None
    scale_group: int | None = None

    @property
    def activation_quant_key(self) -> QuantKey | None:
        if not self.quantizes_activations:
            return None
        if self.scale_group is None:
            return kInt8DynamicTokenSym
        return activation_key(torch.int8, static=False, group=GroupShape(1, self.scale_group))

    def describe(self) -> str:
        rotation = f", rotated in groups of {self.rotation_group}" if self.rotation_group else ""
        per = f"per-token and {self.scale_group} inputs" if self.scale_group else "per-token"
        acts = f"int8, {per}, dynamic" if self.quantizes_activations else "weight-only"
        grouping = self.weight_quant_key.group_shape.describe()
        return f"[{self.out_features}x{self.in_features}] weights int8, {grouping}{rotation}; activations {acts}"


class Int8LinearKernel(ABC):
    """One way to compute ``x @ W.T + bias`` for an int8 layer (``W`` possibly stored rotated)."""

    name: ClassVar[str]

    def __init__(self, config: Int8LinearLayerConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        # What rounds this call's activations (``None``: they stay in high precision); reports read it.
        self.input_quant = (
            functools.partial(quantize_int8_rows, group=config.rotation_group, scale_group=config.scale_group)
            if config.quantizes_activations
            else None
        )

    @classmethod
    @abstractmethod
    def is_supported(cls, device: torch.device, forced: bool = False) -> tuple[bool, str | None]:
        """Whether this kernel runs on ``device`` at all."""

    @classmethod
    @abstractmethod
    def can_implement(cls, config: Int8LinearLayerConfig) -> tuple[bool, str | None]:
        """``(True, None)`` if this kernel can multiply this layer's scheme and shape, else ``(False, reason)``."""

    @abstractmethod
    def matmul(self, x: Tensor, x_scale: Tensor | None, params: Fp8LinearParams) -> Tensor:
        """``x`` [M, K] (int8 with ``x_scale`` [M, 1] or ``[M, K / g]``, else high precision) times the weight:
        float32 [M, N] with every scale applied, bias not yet."""

    def apply(self, params: Fp8LinearParams, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """The layer's output for ``x`` of shape ``[..., K]``: ``[..., N]`` in the output dtype."""
        out_dtype = self.output_dtype(x)
        rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        params = params.to(x.device)
        x_scale = None
        if self.input_quant is not None:
            rows, x_scale = self.input_quant(rows)
        out = self.matmul(rows, x_scale, params)
        if bias is not None:
            out = out.add_(bias.to(out.device, out.dtype))
        out = out.to(out_dtype)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])

    def prepare(self, weight_scale: Tensor, input_scale: Tensor | None, weight_group: GroupShape,
                activation_quantizer, bias: Tensor | None, x: Tensor) -> Product:  # fmt: skip
        """As a prepared call runs it (``prepared``): ``apply`` with the layer's tensors but the weight bound."""
        return general_product(self.apply, weight_scale, input_scale, weight_group, activation_quantizer, bias)

    def output_dtype(self, x: Tensor) -> torch.dtype:
        if self.config.out_dtype is not None:
            return self.config.out_dtype
        return x.dtype if x.dtype in _FLOAT_DTYPES else torch.bfloat16


def _column_scale(params: Fp8LinearParams) -> Tensor:
    """The weight scale as a row ``[1, N]`` (per channel) or a scalar, float32."""
    scale = params.weight_scale.float()
    return scale.view(1, -1) if scale.dim() == 1 else scale


def grouped_product(x: Tensor, x_scale: Tensor, params: Fp8LinearParams) -> Tensor:
    """int8 ``x [M, K]`` with group scales ``[M, K / g]`` times a weight with group scales ``[N, K / g]``: the
    int8 values times their scales, multiplied in float32 (each term is ``q_x * s_x * q_w * s_w``, the group-wise
    sum of the fused GEMM up to float32 summation order)."""
    values = x.float() * spread_group_scale(x_scale.float(), x.shape[-1])
    return torch.matmul(values, dequantize_int8_weight(params.weight, params.weight_scale).t())


@functools.cache
def int_mm_unsupported(device_type: str, index: int | None) -> str | None:
    """Why ``torch._int_mm`` has no integer tensor cores on this device (``None``: it has), checked once."""
    if not hasattr(torch, "_int_mm"):
        return "this torch has no torch._int_mm"
    if device_type != "cuda":
        return f"{device_type} has no int8 tensor cores for torch._int_mm"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if torch.version.hip is not None:
        return "torch._int_mm on ROCm is not tested by this pack"
    capability = torch.cuda.get_device_capability(index if index is not None else torch.cuda.current_device())
    if capability < (7, 5):
        return f"GPU capability {capability[0]}.{capability[1]} has no int8 tensor cores (needs 7.5+)"
    return None


class IntMMKernel(Int8LinearKernel):
    """``torch._int_mm`` (cuBLASLt int8 GEMM, int32 out), then the row and column scales and the bias."""

    name = "int_mm"

    @classmethod
    def is_supported(cls, device: torch.device, forced: bool = False) -> tuple[bool, str | None]:
        reason = int_mm_unsupported(device.type, device.index)
        return reason is None, reason

    @classmethod
    def can_implement(cls, config: Int8LinearLayerConfig) -> tuple[bool, str | None]:
        if not config.quantizes_activations:
            return False, WEIGHT_ONLY_REASON
        if config.in_features % 8 or config.out_features % 8:
            return False, (
                f"torch._int_mm needs in/out features divisible by 8, layer is "
                f"{config.out_features}x{config.in_features}"
            )
        return True, None

    def matmul(self, x: Tensor, x_scale: Tensor | None, params: Fp8LinearParams) -> Tensor:
        if self.config.scale_group is not None:  # no int32 product takes group scales: the float32 one
            return grouped_product(x, x_scale, params)
        return self._product(x, params).float().mul_(x_scale).mul_(_column_scale(params))

    @staticmethod
    def _product(x: Tensor, params: Fp8LinearParams) -> Tensor:
        """The exact int32 product ``x [M, K] @ W.T``."""
        rows = x.shape[0]
        if rows < INT_MM_MIN_ROWS:
            x = F.pad(x, (0, 0, 0, INT_MM_PADDED_ROWS - rows))
        # [N, K] contiguous, passed transposed: the column-major [K, N] operand the int8 GEMM reads fastest.
        return torch._int_mm(x, params.weight.t())[:rows]

    def apply(self, params: Fp8LinearParams, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """On a CUDA GPU, for bf16/fp16 activations: the rotation and rounding in Triton, then a Triton int8 GEMM with
        the scales, bias and cast in its epilogue (faster than ``_int_mm`` on every DiT shape measured on an H200,
        ``bench/bench_int8_gemm.py``), the same numbers as the operations they replace."""
        rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        int8_triton = _fused_kernels() if rows.is_cuda and not FUSED_OFF else None
        if int8_triton is None or not int8_triton.supports_quantize(rows, self.config.rotation_group):
            return super().apply(params, x, bias)
        params = params.to(x.device)
        if self.config.scale_group is not None:
            return self._apply_grouped(int8_triton, params, rows, x, bias)
        codes, x_scale = int8_triton.quantize_rows(rows, self.config.rotation_group)
        if int8_triton.supports_scaled_mm(codes, params.weight):
            out = int8_triton.scaled_int8_mm(
                codes, params.weight, x_scale, _column_scale(params), bias, self.output_dtype(x)
            )
        else:
            out = int8_triton.scale_bias(
                self._product(codes, params), x_scale, _column_scale(params), bias, self.output_dtype(x)
            )
        return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])

    def _apply_grouped(self, int8_triton, params: Fp8LinearParams, rows: Tensor, x: Tensor, bias: Tensor | None):
        """Group scales: the rotation and rounding with one scale per row and group in one kernel, then the GEMM
        that scales each group's int32 dot in float32 as it goes."""
        group = self.config.scale_group
        if not (
            int8_triton.supports_grouped(rows, self.config.rotation_group, group)
            and params.weight.stride(1) == 1
            and params.weight_scale.dim() == 2
        ):
            return Int8LinearKernel.apply(self, params, x, bias)
        codes, x_scale = int8_triton.quantize_groups(rows, self.config.rotation_group, group)
        out = int8_triton.grouped_int8_mm(codes, params.weight, x_scale, params.weight_scale, group, bias,
                                          self.output_dtype(x))
        return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])


@functools.cache
def _fused_kernels():
    """``int8_triton``, imported once (``None`` without Triton: the torch operations run instead)."""
    try:
        from .. import int8_triton
    except ImportError:
        return None
    return int8_triton


# FP8_QUANT_INT8_FUSED=off: the torch operations instead of the fused kernels (for comparisons).
FUSED_OFF = os.environ.get("FP8_QUANT_INT8_FUSED", "").strip().lower() == "off"


class Int8DequantKernel(Int8LinearKernel):
    """Runs anywhere: the int8 values multiplied in float32 with the same scales (or, weight-only, the activations
    rotated as the weight is and multiplied with its dequantized values, in the activation's dtype)."""

    name = "dequant"

    @classmethod
    def is_supported(cls, device: torch.device, forced: bool = False) -> tuple[bool, str | None]:
        return True, None

    @classmethod
    def can_implement(cls, config: Int8LinearLayerConfig) -> tuple[bool, str | None]:
        return True, None

    def matmul(self, x: Tensor, x_scale: Tensor | None, params: Fp8LinearParams) -> Tensor:
        if x_scale is not None and self.config.scale_group is not None:
            return grouped_product(x, x_scale, params)
        if x_scale is not None:
            acc = torch.matmul(x.float(), params.weight.float().t())
            return acc.mul_(x_scale).mul_(_column_scale(params))
        dtype = x.dtype if x.dtype in _FLOAT_DTYPES else torch.float32
        values = rotated(x, self.config.rotation_group).to(dtype)
        if params.weight_scale.dim() == 2:  # group scales
            weight = dequantize_int8_weight(params.weight, params.weight_scale, dtype=dtype)
        else:
            weight = params.weight.to(dtype) * _column_scale(params).to(dtype).reshape(-1, 1)
        return F.linear(values, weight).float()


INT8_KERNELS: tuple[type[Int8LinearKernel], ...] = (IntMMKernel, Int8DequantKernel)
INT8_KERNEL_NAMES: tuple[str, ...] = tuple(kernel.name for kernel in INT8_KERNELS)
