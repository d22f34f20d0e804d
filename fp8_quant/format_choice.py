"""``quant_format`` ``auto``: which 8-bit format a bf16/fp16 model is quantized to on the fly, per device.

Why per device: the two formats trade speed for accuracy differently on each. Where FP8 tensor cores exist (Ada,
Hopper, Blackwell) the fp8 linear is the faster one: a rotated int8 linear costs more there, in the int8 GEMM
itself and in the activations' rotation (``bench/bench_int8_gemm.py``), for less error on DiTs with outlier
channels (bench/NOTES.md); a user who wants that asks for ``int8_rotated``. Where only int8 tensor cores exist
(Turing, Ampere: RTX 20xx/30xx, A100) fp8 runs dequantized in 16 bits while int8 runs on the tensor cores, so int8
rotated is both the faster and the more accurate. Where neither exists (CPUs, older GPUs) every layer is
dequantized and multiplied in 16 bits or more whatever its format, so rounding the activations only adds error and
nothing is faster for it: there ``auto`` keeps the activations unrounded (weight-only) and takes int8 rotated
weights, which round with about a third of e4m3's error (8-bit integers with a scale per output channel, after a
Hadamard rotation that leaves each row's values close to Gaussian) at the same memory; the rotation of the
activations per call is small beside the matmul. A user who asks for rounded activations (an activation scheme:
an FP8 GPU's numbers), for weight scales int8 has no form for (blocks) or for an fp8 kernel gets fp8, and the
summary says why. A layer int8 cannot rotate as configured takes a smaller group or none (``methods_int8``). Only
layers quantized on the fly take this (``Fp8Recipe.for_checkpoint``): a file's own 8-bit layers keep their format
and the activation scheme the user's options give them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch

from .config import AUTO, INT8_WEIGHT_GRANULARITIES, QuantFormat, UserOptions
from .fp8_utils import fp8_compute_unsupported
from .kernels.int8_mm import INT8_KERNEL_NAMES, int_mm_unsupported


class DeviceFormat(NamedTuple):
    """What ``auto`` stands for on a device: the format, why, and whether every layer runs dequantized there."""

    format: QuantFormat
    reason: str
    dequantized: bool


def resolve_quant_format(options: UserOptions, device: torch.device | str,
                         kernel: str | None = None) -> tuple[UserOptions, str | None]:  # fmt: skip
    """``options`` with ``quant_format`` ``auto`` replaced by the format for ``device`` (and, where every layer is
    dequantized, activations left unrounded), and the sentence saying which and why (``None`` where the user chose a
    format). ``kernel``: a kernel the user forced (``None``: auto)."""
    if options.format is not QuantFormat.AUTO:
        return options, None
    choice = format_for_device(torch.device(device))
    if not choice.dequantized:
        return replace(options, quant_format=choice.format.value), \
            f"quant_format auto: {choice.format.value} ({choice.reason})"  # fmt: skip
    kept = fp8_choices(options, kernel)
    if kept:
        return replace(options, quant_format=QuantFormat.FP8.value), \
            f"quant_format auto: fp8 ({choice.reason}; fp8 kept: {kept})"  # fmt: skip
    # Activations stay unrounded, so their granularity has no meaning here (as for fp8 on a dequantized layer).
    weight_only = replace(options, quant_format=choice.format.value, activation_scheme="none",
                          activation_granularity=AUTO)  # fmt: skip
    return weight_only, f"quant_format auto: {choice.format.value}, weight-only ({choice.reason})"


def fp8_choices(options: UserOptions, kernel: str | None = None) -> str:
    """The user's choices that want fp8 where every layer is dequantized, and why, as the options are named (empty:
    none): an activation scheme that rounds (reproducing an FP8 GPU's numbers), weight scales int8 has no form
    for, a forced kernel of the fp8 family."""
    named = []
    if kernel not in (None, *INT8_KERNEL_NAMES):
        named.append(f"kernel {kernel!r} is an fp8 kernel")
    if options.activation_scheme not in (AUTO, "none"):
        named.append(f"activation_scheme {options.activation_scheme!r} rounds activations as an FP8 GPU does")
    if options.weight_granularity not in (AUTO, *INT8_WEIGHT_GRANULARITIES):
        named.append(f"weight_granularity {options.weight_granularity!r} has no int8 form")
    return ", ".join(named)


def format_for_device(device: torch.device) -> DeviceFormat:
    """The 8-bit format ``auto`` takes on ``device`` and why."""
    no_fp8 = fp8_compute_unsupported(device)
    if no_fp8 is None:
        return DeviceFormat(QuantFormat.FP8, "FP8 tensor cores here: fp8 is the faster format, int8_rotated the more "
                            "accurate", False)  # fmt: skip
    no_int8 = int_mm_unsupported(device.type, device.index)
    if no_int8 is None:
        return DeviceFormat(QuantFormat.INT8_ROTATED, f"{no_fp8}; its int8 tensor cores make int8 rotated faster and "
                            "more accurate", False)  # fmt: skip
    return DeviceFormat(QuantFormat.INT8_ROTATED, f"{no_fp8} nor int8 ones: every layer is dequantized, so "
                        "activations stay unrounded and int8 rotated weights are the more accurate", True)  # fmt: skip
