"""Whether an fp8 GEMM runs with fast accumulation: by kernel (the default), or timed per problem on request.

Why: on Hopper, the fp8 GEMMs behind ``_scaled_mm`` promote their partial sums to fp32 every few K-steps unless
told not to (``use_fast_accum=True``). On the GPUs measured (``bench/bench_gemm_variants.py``; the figures are in
``bench/NOTES.md``, "Where the code's choices come from") the row-wise GEMM (per-token x per-channel scales) ran
faster without the promotion on every DiT shape and in every run, which brings it level with the per-tensor GEMM;
the per-tensor GEMM's gain was small, sometimes a loss, and moved between runs and even between two timings in one
process. The error it adds is small beside that of rounding both operands to fp8. The stock ComfyUI path keeps it
off.

So the default (``rowwise``) is a fixed rule: fast accumulation for the row-wise kernel, exact for per-tensor. The
same model then computes the same image in every run, which a choice timed at run time could not promise (timings
of the per-tensor GEMM flipped). ``auto`` times each problem both ways at its first eager call instead, for GPUs
where the rule may not hold, keeping fast accumulation only where two independent timings both find it faster by
``MARGIN``. Under ``torch.compile`` and in CUDA-graph captures nothing is timed (the fixed rule still applies).

``FP8_QUANT_FAST_ACCUM``: ``rowwise`` (default), ``auto``, ``on`` or ``off`` (everywhere).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

FAST_ACCUM_ENV = "FP8_QUANT_FAST_ACCUM"
DEFAULT_SETTING = "rowwise"
FAST_ACCUM_CHOICES = (DEFAULT_SETTING, "auto", "on", "off")
# ``auto`` does not time smaller GEMMs (exact accumulation): under ~50 GFLOP (a DiT's 512 text tokens) the host's
# launches set the pace, and the two ways timed within noise of each other.
MIN_FLOP = 5e10
# ``auto``: fast accumulation must take at most this fraction of the exact time, in both timings, to be chosen.
MARGIN = 0.93
_ROUNDS = 4  # per half
_TARGET_ROUND_MS = 2.0

_decided: dict[tuple, bool] = {}


def fast_accum_setting() -> str:
    """``FP8_QUANT_FAST_ACCUM``, checked: a wrong value is an error naming the variable, not a silent default."""
    value = (os.environ.get(FAST_ACCUM_ENV) or DEFAULT_SETTING).strip().lower()
    if value not in FAST_ACCUM_CHOICES:
        raise ValueError(f"{FAST_ACCUM_ENV}: unknown value {value!r}; allowed values: {list(FAST_ACCUM_CHOICES)}")
    return value


def problem_key(kind: str, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype, bias: bool) -> tuple:
    """What the speed of a GEMM depends on: the kernel kind, M, K, N, the output dtype, a fused bias, the GPU."""
    return (kind, int(x.shape[0]), int(x.shape[1]), int(weight.shape[0]), out_dtype, bias, x.device.index)


def on_gpu(x: torch.Tensor) -> bool:
    """Fast accumulation is a cuBLASLt flag: CUDA tensors only (a hook for CPU tests of the decision)."""
    return x.is_cuda


def fixed_fast_accum(setting: str, by_rule: bool, x: torch.Tensor) -> bool | None:
    """The choice where it does not depend on the problem (every setting but ``auto`` on a GPU), else ``None``."""
    if not on_gpu(x) or setting == "off":
        return False
    if setting == "on":
        return True
    if setting == DEFAULT_SETTING:
        return by_rule
    return None


def use_fast_accum(
    setting: str,
    kind: str,
    by_rule: bool,
    x: torch.Tensor,
    weight: torch.Tensor,
    out_dtype: torch.dtype,
    bias: bool,
    run: Callable[[bool], torch.Tensor],
) -> bool:
    """Whether ``x [M, K] @ weight [N, K].T`` should use fast accumulation; ``run(fast)`` computes it either way.

    ``setting`` is ``fast_accum_setting()``, read when the kernel was made (the forward stays free of environment
    lookups); ``by_rule`` is the kernel's answer under the default rule. Under ``auto`` the first eager call of a
    problem times it (a few ms, once per shape per process); while compiling (so that no guard ties a graph to a
    token count) or capturing a CUDA graph, a problem keeps the exact accumulation.
    """
    fixed = fixed_fast_accum(setting, by_rule, x)
    if fixed is not None:
        return fixed
    if torch.compiler.is_compiling():
        return False
    flop = 2.0 * x.shape[0] * x.shape[1] * weight.shape[0]
    if flop < MIN_FLOP:
        return False
    key = problem_key(kind, x, weight, out_dtype, bias)
    decided = _decided.get(key)
    if decided is not None:
        return decided
    if torch.cuda.is_current_stream_capturing():
        return False
    halves = time_both(run, flop, x.device)
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


def time_both(
    run: Callable[[bool], torch.Tensor], flop: float, device: torch.device
) -> tuple[tuple[float, float], tuple[float, float]]:
    """ms per call of ``run(False)`` and ``run(True)`` on ``device``, in two independent halves:
    ``((exact, fast), (exact, fast))``.

    Rounds alternate the two ways, so a change of clock or power between rounds falls on both alike; each half
    keeps each way's fastest round (noise only ever adds time). ``decide`` wants both halves to agree, so a shape
    near a tie keeps exact accumulation. One output at a time is alive; where even that does not fit (the GEMM
    itself barely does), the problem is reported as a tie and keeps exact accumulation.
    """
    calls = max(1, min(16, math.ceil(_TARGET_ROUND_MS / max(flop / 1e12, 1e-3))))  # >= ~2 ms a round at 1 PFLOP/s
    try:
        with torch.cuda.device(device):  # events on the GEMM's own device, whichever is current
            run(False)  # warm-up: cuBLASLt's heuristics and workspace
            run(True)
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
    except torch.OutOfMemoryError:
        logger.info("fp8 GEMM timing skipped: out of GPU memory; exact accumulation kept")
        return (1.0, 1.0), (1.0, 1.0)
    return halves[0], halves[1]


def decide(halves: tuple[tuple[float, float], tuple[float, float]]) -> bool:
    """Fast accumulation where both halves measured it at least ``1 / MARGIN`` times faster."""
    return all(fast <= MARGIN * exact for exact, fast in halves)


def decisions() -> dict[tuple, bool]:
    """The problems ``auto`` timed so far and their choice (for benchmarks and tests)."""
    return dict(_decided)


def forget() -> None:
    """Drop every decision (tests; a user changing GPUs in one process gets new keys anyway)."""
    _decided.clear()
