"""Whether an fp8 GEMM runs with cuBLASLt's fast accumulation, decided per problem by timing both ways once.

Why: on Hopper, the fp8 GEMMs behind ``_scaled_mm`` promote their partial sums to fp32 every few K-steps unless
told not to (``use_fast_accum=True``). Measured on an H100 with torch 2.11 (``bench/bench_gemm_variants.py``):
the row-wise GEMM (per-token x per-channel scales) runs 1.06-1.28x faster without the promotion on every DiT shape,
which brings it level with the per-tensor GEMM; the per-tensor GEMM gains 0-7% on some shapes, loses up to 8% on
others, and its gain moves between runs. The error it adds, ~2e-3 relative per layer, is small beside the ~3.7e-2
of rounding both operands to fp8 (a layer's error moved by 0.1-0.4%, a Wan step's not at all). The stock ComfyUI
path keeps it off. So each distinct problem is timed on its real operands at its first call, and fast accumulation
kept only where two independent timings both find it faster by ``MARGIN``: a shape near a tie keeps the exact
accumulation, so the choice, and with it the output, stays the same from one run to the next.

``FP8_QUANT_FAST_ACCUM``: ``auto`` (default: measure), ``on`` or ``off`` (everywhere).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

FAST_ACCUM_ENV = "FP8_QUANT_FAST_ACCUM"
FAST_ACCUM_CHOICES = ("auto", "on", "off")
# Smaller GEMMs are not timed (fast accumulation off): under ~50 GFLOP (~40 us on an H100; a DiT's 512 text
# tokens) the host's launches set the pace, and the two ways timed within noise of each other, flipping between runs.
MIN_FLOP = 5e10
# Fast accumulation must take at most this fraction of the exact time, in both timings, to be chosen. Per-tensor
# gains of 4-7% came and went between runs on the same H100; the row-wise gains (15-28% on Wan) never did.
MARGIN = 0.93
_ROUNDS = 4  # per half
_TARGET_ROUND_MS = 2.0

_decided: dict[tuple, bool] = {}


def fast_accum_setting() -> str:
    """``FP8_QUANT_FAST_ACCUM``, checked: a wrong value is an error naming the variable, not a silent default."""
    value = (os.environ.get(FAST_ACCUM_ENV) or "auto").strip().lower()
    if value not in FAST_ACCUM_CHOICES:
        raise ValueError(f"{FAST_ACCUM_ENV}: unknown value {value!r}; allowed values: {list(FAST_ACCUM_CHOICES)}")
    return value


def problem_key(kind: str, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype, bias: bool) -> tuple:
    """What the speed of a GEMM depends on: the kernel kind, M, K, N, the output dtype, a fused bias, the GPU."""
    return (kind, int(x.shape[0]), int(x.shape[1]), int(weight.shape[0]), out_dtype, bias, x.device.index)


def on_gpu(x: torch.Tensor) -> bool:
    """Fast accumulation is a cuBLASLt flag: CUDA tensors only (a hook for CPU tests of the decision)."""
    return x.is_cuda


def use_fast_accum(
    setting: str,
    kind: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    out_dtype: torch.dtype,
    bias: bool,
    run: Callable[[bool], torch.Tensor],
) -> bool:
    """Whether ``x [M, K] @ weight [N, K].T`` should use fast accumulation; ``run(fast)`` computes it either way.

    ``setting`` is ``fast_accum_setting()``, read when the kernel was made (the forward stays free of environment
    lookups). The first eager call of a problem times it (a few ms, once per shape per process). Inside
    ``torch.compile`` a problem already timed keeps its choice, one not yet timed (or of symbolic size) keeps the
    exact accumulation, as does any problem first met in a CUDA graph capture.
    """
    if setting != "auto":
        return setting == "on" and on_gpu(x)
    if not on_gpu(x) or not all(isinstance(size, int) for size in (*x.shape, *weight.shape)):
        return False
    key = problem_key(kind, x, weight, out_dtype, bias)
    decided = _decided.get(key)
    if decided is not None:
        return decided
    flop = 2.0 * x.shape[0] * x.shape[1] * weight.shape[0]
    if flop < MIN_FLOP or torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return False
    halves = time_both(run, flop)
    decided = decide(halves)
    _decided[key] = decided
    logger.info(
        "fp8 GEMM %s M=%d K=%d N=%d -> %s: %s accumulation (exact / fast ms: %.3f / %.3f, then %.3f / %.3f)",
        *key[:5],
        "fast" if decided else "exact",
        *halves[0],
        *halves[1],
    )
    return decided


def time_both(run: Callable[[bool], torch.Tensor], flop: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """ms per call of ``run(False)`` and ``run(True)``, in two independent halves: ``((exact, fast), (exact, fast))``.

    Rounds alternate the two ways, so a change of clock or power between rounds falls on both alike; each half
    keeps each way's fastest round (noise only ever adds time). ``decide`` wants both halves to agree, so a shape
    near a tie does not flip from one run to the next."""
    calls = max(1, min(16, math.ceil(_TARGET_ROUND_MS / max(flop / 1e12, 1e-3))))  # >= ~2 ms a round at 1 PFLOP/s
    run(False), run(True)  # warm-up: cuBLASLt's heuristics and workspace
    halves = []
    for _ in range(2):
        best = {False: math.inf, True: math.inf}
        for _ in range(_ROUNDS):
            for fast in (False, True):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(calls):
                    run(fast)
                end.record()
                end.synchronize()
                best[fast] = min(best[fast], start.elapsed_time(end) / calls)
        halves.append((best[False], best[True]))
    return halves[0], halves[1]


def decide(halves: tuple[tuple[float, float], tuple[float, float]]) -> bool:
    """Fast accumulation where both halves measured it at least ``1 / MARGIN`` times faster."""
    return all(fast <= MARGIN * exact for exact, fast in halves)


def decisions() -> dict[tuple, bool]:
    """The problems timed so far and their choice (for benchmarks and tests)."""
    return dict(_decided)


def forget() -> None:
    """Drop every decision (tests; a user changing GPUs in one process gets new keys anyway)."""
    _decided.clear()
