"""Pick the fastest kernel that can run a layer on a device; explain the choice once.

Order: per-tensor ``_scaled_mm`` (fastest, when both operands are per-tensor), row-wise ``_scaled_mm``, then
the dequantize fallback. Automatic selection only uses ``_scaled_mm`` where the device has FP8 tensor cores;
a forced kernel (argument, or the ``FP8_QUANT_KERNEL`` environment variable) is used wherever it can run,
the CPU included, and falls back with a logged reason where it cannot.
"""

from __future__ import annotations

import logging
import os

import torch

from ..fp8_utils import supports_fp8_compute
from .base import FP8ScaledMMLinearKernel, FP8ScaledMMLinearLayerConfig
from .dequant import DequantLinearKernel
from .scaled_mm import ChannelWiseScaledMMKernel, PerTensorScaledMMKernel

logger = logging.getLogger(__name__)

KERNEL_ENV = "FP8_QUANT_KERNEL"
KERNELS: tuple[type[FP8ScaledMMLinearKernel], ...] = (
    PerTensorScaledMMKernel,
    ChannelWiseScaledMMKernel,
    DequantLinearKernel,
)
KERNEL_NAMES: tuple[str, ...] = ("auto", *(kernel.name for kernel in KERNELS))

_logged: set[str] = set()
_cache: dict[tuple, FP8ScaledMMLinearKernel] = {}


def kernel_class(name: str) -> type[FP8ScaledMMLinearKernel]:
    for kernel in KERNELS:
        if kernel.name == name:
            return kernel
    raise ValueError(f"unknown fp8 kernel {name!r}; allowed values: {list(KERNEL_NAMES)}")


def forced_kernel_name(forced: str | None = None) -> str | None:
    """The kernel asked for by argument, else by ``FP8_QUANT_KERNEL``; ``None`` or ``"auto"`` means choose."""
    name = forced or os.environ.get(KERNEL_ENV) or None
    if name is None or name == "auto":
        return None
    kernel_class(name)  # validates
    return name


def explain_choice(
    config: FP8ScaledMMLinearLayerConfig, device: torch.device | str, forced: str | None = None
) -> tuple[type[FP8ScaledMMLinearKernel], str]:
    """The kernel class for this layer on ``device`` and a sentence saying why."""
    device = torch.device(device)
    forced_name = forced_kernel_name(forced)
    rejected: list[str] = []
    if forced_name is not None:
        chosen = kernel_class(forced_name)
        ok, reason = chosen.can_implement(config, device)
        if ok:
            return chosen, f"{chosen.name} (forced)"
        rejected.append(f"forced {forced_name}: {reason}")
    if not supports_fp8_compute(device):
        rejected.append(f"{device} has no FP8 compute (needs CUDA capability 8.9+)")
        candidates: tuple[type[FP8ScaledMMLinearKernel], ...] = (DequantLinearKernel,)
    else:
        candidates = KERNELS
    for candidate in candidates:
        ok, reason = candidate.can_implement(config, device)
        if ok:
            why = "; ".join(rejected) if rejected else "fastest kernel that can run it"
            return candidate, f"{candidate.name} because {why}"
        rejected.append(f"{candidate.name}: {reason}")
    raise RuntimeError(f"no fp8 kernel can run {config.describe()} on {device}: {'; '.join(rejected)}")


def select_kernel(
    config: FP8ScaledMMLinearLayerConfig, device: torch.device | str, forced: str | None = None
) -> FP8ScaledMMLinearKernel:
    """A kernel instance for this layer config and device (cached); logs each distinct reason once."""
    device = torch.device(device)
    key = (config, device.type, device.index, forced, os.environ.get(KERNEL_ENV))
    kernel = _cache.get(key)
    if kernel is None:
        kernel_cls, why = explain_choice(config, device, forced)
        kernel = kernel_cls(config)
        _cache[key] = kernel
        message = f"fp8 kernel for {config.describe()} on {device}: {why}"
        if message not in _logged:
            _logged.add(message)
            level = logging.WARNING if (forced_kernel_name(forced) and "(forced)" not in why) else logging.INFO
            logger.log(level, message)
    return kernel
