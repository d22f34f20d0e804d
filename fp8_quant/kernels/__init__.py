"""FP8 linear kernels: ``_scaled_mm`` per-tensor, row-wise and block-scaled, a dequantize fallback, and their
selection."""

from . import fast_accum
from .base import FP8ScaledMMLinearKernel, FP8ScaledMMLinearLayerConfig
from .block_scaled_mm import BlockScaledMMKernel
from .dequant import DequantLinearKernel
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
    "KERNELS",
    "KERNEL_ENV",
    "KERNEL_NAMES",
    "BlockScaledMMKernel",
    "ChannelWiseScaledMMKernel",
    "DequantLinearKernel",
    "FP8ScaledMMLinearKernel",
    "FP8ScaledMMLinearLayerConfig",
    "PerTensorScaledMMKernel",
    "block_groups_at_speed",
    "explain_choice",
    "fast_accum",
    "kernel_class",
    "select_kernel",
]
