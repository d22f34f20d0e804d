"""Pick the fastest kernel that can run a layer on a device; explain the choice once.

Kernels are tried in ``KERNELS`` order (fastest first); the first whose ``is_supported(device)`` and
``can_implement(layer)`` both say yes runs the layer, and the reasons of those passed over become the logged
explanation. A forced kernel (argument, or the ``FP8_QUANT_KERNEL`` environment variable) is tried first and may
run where automatic choice would not (``_scaled_mm`` on the CPU); where it cannot run, selection falls back with
the reason logged as a warning.
"""

from __future__ import annotations

import logging
import os

import torch

from ..fp8_utils import fp8_compute_unsupported
from .base import FP8ScaledMMLinearKernel, FP8ScaledMMLinearLayerConfig
from .block_scaled_mm import BlockScaledMMKernel
from .dequant import DequantLinearKernel
from .fast_accum import FAST_ACCUM_ENV
from .scaled_mm import ChannelWiseScaledMMKernel, PerTensorScaledMMKernel

logger = logging.getLogger(__name__)

KERNEL_ENV = "FP8_QUANT_KERNEL"
KERNELS: tuple[type[FP8ScaledMMLinearKernel], ...] = (
    PerTensorScaledMMKernel,
    ChannelWiseScaledMMKernel,
    BlockScaledMMKernel,
    DequantLinearKernel,
)
KERNEL_NAMES: tuple[str, ...] = ("auto", *(kernel.name for kernel in KERNELS))

_logged: set[str] = set()
_cache: dict[tuple, FP8ScaledMMLinearKernel] = {}


def kernel_class(name: str, option: str = "kernel") -> type[FP8ScaledMMLinearKernel]:
    for kernel in KERNELS:
        if kernel.name == name:
            return kernel
    raise ValueError(f"{option}: unknown fp8 kernel {name!r}; allowed values: {list(KERNEL_NAMES)}")


def block_groups_at_speed(device: torch.device | str) -> bool:
    """Whether weights in groups of 128 inputs cost no speed on ``device``: only
    where it has no fp8 GEMM at all (every layer is dequantized there anyway: CPUs, pre-Ada GPUs)."""
    device = torch.device(device)
    if fp8_compute_unsupported(device) is not None:
        return True
    # The block-scaled GEMM runs slower than the row-wise one on DiT shapes (bench/bench_blockwise.py, figures in
    # bench/NOTES.md), so groups are not free where row-wise fp8 runs: per channel is chosen there.
    return False


def forced_kernel_name(forced: str | None = None) -> str | None:
    """The kernel asked for by argument, else by ``FP8_QUANT_KERNEL``; ``None`` or ``"auto"`` means choose."""
    if forced is not None and forced != "auto":
        kernel_class(forced)  # validates
        return forced
    name = os.environ.get(KERNEL_ENV) or None
    if name is None or name == "auto":
        return None
    kernel_class(name, KERNEL_ENV)
    return name


def _verdict(
    kernel: type[FP8ScaledMMLinearKernel], config: FP8ScaledMMLinearLayerConfig, device: torch.device, forced: bool
) -> str | None:
    ok, reason = kernel.is_supported(device, forced)
    if ok:
        ok, reason = kernel.can_implement(config)
    return None if ok else reason


def explain_choice(
    config, device: torch.device | str, forced: str | None = None, kernels: tuple[type, ...] = KERNELS
) -> tuple[type, str]:
    """The kernel class for this layer on ``device`` and a sentence saying why. ``kernels``: the family to choose
    from, fastest first (the fp8 ``KERNELS``, or the int8 ones); a forced name outside it is passed over."""
    device = torch.device(device)
    forced_name = forced_kernel_name(forced)
    rejected: list[str] = []
    if forced_name is not None:
        chosen = next((kernel for kernel in kernels if kernel.name == forced_name), None)
        reason = "not a kernel for these weights" if chosen is None else _verdict(chosen, config, device, forced=True)
        if reason is None:
            return chosen, f"{chosen.name} (forced)"
        rejected.append(f"forced {forced_name}: {reason}")
    passed_over: dict[str, list[str]] = {}  # reason -> kernels it ruled out (one sentence per reason)
    for candidate in kernels:
        reason = _verdict(candidate, config, device, forced=False)
        if reason is None:
            if len(passed_over) == 1 and not rejected:  # one reason ruled out every faster kernel: just the reason
                rejected = list(passed_over)
            else:
                rejected += [f"{', '.join(names)}: {why}" for why, names in passed_over.items()]
            why = "; ".join(rejected) if rejected else "fastest kernel that can run it"
            return candidate, f"{candidate.name} because {why}"
        passed_over.setdefault(reason, []).append(candidate.name)
    rejected += [f"{', '.join(names)}: {why}" for why, names in passed_over.items()]
    raise RuntimeError(f"no kernel can run {config.describe()} on {device}: {'; '.join(rejected)}")


def select_kernel(config, device: torch.device | str, forced: str | None = None, kernels: tuple[type, ...] = KERNELS):
    """A kernel instance for this layer config and device (cached); logs each distinct reason once. ``kernels``: the
    family (see ``explain_choice``)."""
    device = torch.device(device)
    key = (config, device.type, device.index, forced, os.environ.get(KERNEL_ENV), os.environ.get(FAST_ACCUM_ENV))
    kernel = _cache.get(key)
    if kernel is None:
        kernel_cls, why = explain_choice(config, device, forced, kernels)
        kernel = kernel_cls(config, device)
        _cache[key] = kernel
        message = f"kernel for {config.describe()} on {device}: {why}"
        if message not in _logged and not torch.compiler.is_compiling():
            _logged.add(message)
            level = logging.WARNING if (forced_kernel_name(forced) and "(forced)" not in why) else logging.INFO
            logger.log(level, message)
    return kernel
