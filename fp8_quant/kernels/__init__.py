"""Linear kernels: fp8 ``_scaled_mm`` per-tensor, row-wise and block-scaled, a dequantize fallback; int8
``_int_mm`` and its dequantize fallback; and their selection."""

from . import fast_accum
from .base import FP8ScaledMMLinearKernel, FP8ScaledMMLinearLayerConfig
from .block_scaled_mm import BlockScaledMMKernel
from .dequant import DequantLinearKernel
from .int8_mm import INT8_KERNELS, Int8DequantKernel, Int8LinearKernel, Int8LinearLayerConfig, IntMMKernel
from .scaled_mm import ChannelWiseScaledMMKernel, PerTensorScaledMMKernel
from .selection import (
    KERNEL_ENV,
    KERNEL_NAMES,
    KERNELS,
    block_groups_at_speed,
    explain_choice,
    kernel_class,
    select_kernel,
)

__all__ = [
    "INT8_KERNELS",
    "KERNELS",
    "KERNEL_ENV",
    "KERNEL_NAMES",
    "BlockScaledMMKernel",
    "ChannelWiseScaledMMKernel",
    "DequantLinearKernel",
    "FP8ScaledMMLinearKernel",
    "FP8ScaledMMLinearLayerConfig",
    "Int8DequantKernel",
    "Int8LinearKernel",
    "Int8LinearLayerConfig",
    "IntMMKernel",
    "PerTensorScaledMMKernel",
    "block_groups_at_speed",
    "explain_choice",
    "fast_accum",
    "kernel_class",
    "select_kernel",
]
