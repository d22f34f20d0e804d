"""``quant_format`` ``auto``: which 8-bit format a bf16/fp16 model is quantized to on the fly, per GPU.

Why per GPU: the two formats trade speed for accuracy differently on each. Where FP8 tensor cores exist (Ada,
Hopper, Blackwell) the fp8 linear is the faster one: a rotated int8 linear costs more there, in the int8 GEMM
itself and in the activations' rotation (``bench/bench_int8_gemm.py``), for less error on DiTs with outlier
channels (bench/NOTES.md); a user who wants that asks for ``int8_rotated``. Where only int8
tensor cores exist (Turing, Ampere: RTX 20xx/30xx, A100) fp8 runs dequantized in 16 bits while int8 runs on the
tensor cores, so int8 rotated is both the faster and the more accurate. Where neither exists (CPUs) both are
dequantized, and fp8's dequantization is a cast while int8 rotated adds a rotation of the activations per call.
A layer int8 cannot rotate as configured takes a smaller group or none (``methods_int8``); a file's own 8-bit
layers keep their format whatever this says.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .config import QuantFormat, UserOptions
from .fp8_utils import fp8_compute_unsupported
from .kernels.int8_mm import int_mm_unsupported


def resolve_quant_format(options: UserOptions, device: torch.device | str | None) -> tuple[UserOptions, str | None]:
    """``options`` with ``quant_format`` ``auto`` replaced by the format for ``device``, and the sentence saying
    which and why (``None`` where the user chose a format)."""
    if options.format is not QuantFormat.AUTO:
        return options, None
    chosen, reason = format_for_device(torch.device(device) if device is not None else torch.device("cpu"))
    return replace(options, quant_format=chosen.value), f"quant_format auto: {chosen.value} ({reason})"


def format_for_device(device: torch.device) -> tuple[QuantFormat, str]:
    """The faster 8-bit format on ``device`` and why."""
    no_fp8 = fp8_compute_unsupported(device)
    if no_fp8 is None:
        return QuantFormat.FP8, "FP8 tensor cores here: fp8 is the faster format, int8_rotated the more accurate"
    no_int8 = int_mm_unsupported(device.type, device.index)
    if no_int8 is None:
        return QuantFormat.INT8_ROTATED, f"{no_fp8}; its int8 tensor cores make int8 rotated faster and more accurate"
    return QuantFormat.FP8, f"{no_fp8} nor int8 ones: both formats are dequantized, fp8 the cheaper"
