"""FP8 linear kernels: ``_scaled_mm`` per-tensor and row-wise, a dequantize fallback, and their selection."""

from .base import FP8ScaledMMLinearKernel, FP8ScaledMMLinearLayerConfig
from .dequant import DequantLinearKernel
from .scaled_mm import ChannelWiseScaledMMKernel, PerTensorScaledMMKernel
from .selection import KERNEL_ENV, KERNEL_NAMES, KERNELS, explain_choice, kernel_class, select_kernel

__all__ = [
    "KERNELS",
    "KERNEL_ENV",
    "KERNEL_NAMES",
    "ChannelWiseScaledMMKernel",
    "DequantLinearKernel",
    "FP8ScaledMMLinearKernel",
    "FP8ScaledMMLinearLayerConfig",
    "PerTensorScaledMMKernel",
    "explain_choice",
    "kernel_class",
    "select_kernel",
]
