"""Per-layer automatic scale choices: weight granularity at load, activation scales learnt at run time.

Why: per-tensor ``_scaled_mm`` is the fastest FP8 GEMM (on Hopper, ahead of row-wise), and a static activation
scale quantizes in one pass without an amax reduction. e4m3's relative precision is the same everywhere in its
normal range (2^-6 .. 448, 15 binades), so one scale per tensor costs nothing as long as the rows of a weight, or
the tokens of an activation, lie within a few binades of each other; only a layer whose rows or tokens differ
wildly (a weight with dead channels, "massive activation" tokens) needs a scale per channel or per token.

Weights with a few large input columns (trained DiTs have them) are the other case. There the error is carried by
the few large values of each row, and what helps is not more range but those values landing on the fp8 grid: scales
fitted to the least squared error (``fp8_utils.quantize_weight(fit=True)``), one per 128 inputs of a row where that
costs no speed (devices that dequantize every layer anyway; where row-wise fp8 runs, the block-scaled GEMM is
slower, bench/bench_blockwise.py), else one per row. On a tiny Wan 2.1 with large input columns (tests/integration)
fitted groups of 128 had the least error of the choices any fp8 GEMM takes: less than per channel, per tensor or
128x128 blocks (a block still holds 16k values), less than smoothing factors folded into the activations (they make
each column's largest value exact, nothing more); the comparison is in bench/NOTES.md. Fitted groups of 32 would be
better still, but no fp8 GEMM takes those (MX GEMMs take groups of 32 with power-of-two scales, which cannot be
fitted).

Activations, with no host synchronisation on the forward path:
- observing: the first ``policy.calls`` calls run dynamic per-token; device tensors record the largest amax and
  the largest token spread (the largest token amax over the 10th percentile of them). A non-blocking copy to the
  host and a CUDA event follow; once the event has completed (a later call), the host decides.
- static: one-pass quantization with ``scale = margin * amax / 448`` from the largest amax of earlier calls; the
  same pass raises that history to what it saw (values past the range are clamped for that call, and logged), so
  the scale follows for the next call ("delayed scaling", as in Transformer Engine), with no extra kernel.
- dynamic: a layer with outlier tokens keeps its per-token scales.
Inside ``torch.compile`` a layer runs the path of its phase (the observing statistics are tensor operations, so
they run in the graph too), but its per-call host bookkeeping cannot: ``CalibrationTally.after_model_call``, called
once per model call from outside the compiled region (the ComfyUI loader installs it as a model wrapper), does it
for all such layers at once with one batched copy, so that they change phase together and the graph is
recompiled once.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .fp8_utils import AMAX_FLOOR, fp8_max, weight_row_amax
from .quant_fp8 import QuantFP8, as_row_scales
from .report import count_labels
from .scheme import GROUP_128, PER_CHANNEL, PER_TENSOR, PER_TOKEN, GroupShape

logger = logging.getLogger(__name__)

class CalibrationPhase(str, enum.Enum):
    """Where a learning activation quantizer is (see the module docstring); not the config's scheme."""

    OBSERVING = "observing"
    STATIC = "static"
    DYNAMIC = "dynamic"


OBSERVING, STATIC, DYNAMIC = CalibrationPhase.OBSERVING, CalibrationPhase.STATIC, CalibrationPhase.DYNAMIC
_E4M3_MAX = fp8_max(torch.float8_e4m3fn)


@dataclass(frozen=True)
class ScalePolicy:
    """``max_spread``: how far apart (a factor) the largest and the quietest rows (or the 10% quietest tokens) may
    be for one scale per tensor (128 = 7 binades: their values still sit well inside e4m3's normal range).
    ``max_column_spread``: how far the largest input column of a weight may stand above the median column before
    the layer counts as one with outlier columns (random and trained weights without them stay under 2).
    ``calls``: how many calls a layer is watched before its activations are decided. ``margin``: the static
    range's headroom over the largest activation seen (a binade: precision does not depend on it, overflow
    does)."""

    max_spread: float = 128.0
    max_column_spread: float = 4.0
    calls: int = 2
    margin: float = 2.0
    check_every: int = 256


DEFAULT_POLICY = ScalePolicy()


class WeightChoice(NamedTuple):
    """A layer's weight granularity, whether its scales are fitted (``quantize_weight(fit=...)``), and why."""

    group: GroupShape
    reason: str
    fit: bool = False


def choose_weight_group(
    weight: torch.Tensor,
    policy: ScalePolicy = DEFAULT_POLICY,
    groups_at_speed: bool = False,
    rows: torch.Tensor | None = None,
) -> WeightChoice:
    """Per tensor where the weight's rows share a range (the faster GEMM, the same precision), else per channel;
    with fitted scales where a few input columns dominate, in groups of 128 inputs where ``groups_at_speed`` (the
    device runs such groups on its fp8 GEMM, or dequantizes every layer anyway). ``rows``: each row's largest
    magnitude where the caller has it. Magnitudes come from inf-norm reductions: no weight-sized temporary."""
    columns = torch.linalg.vector_norm(weight.detach(), ord=float("inf"), dim=0).float().clamp(min=AMAX_FLOOR)
    column_spread = (columns.max() / columns.median()).item()
    if column_spread > policy.max_column_spread:
        why = f"input columns up to {column_spread:.0f}x the median"
        if groups_at_speed and weight.shape[1] > GROUP_128.row:
            return WeightChoice(GROUP_128, f"{why}: groups of 128 per channel, fitted scales", fit=True)
        return WeightChoice(PER_CHANNEL, f"{why}: per channel, fitted scales", fit=True)
    rows = (rows if rows is not None else weight_row_amax(weight.detach())).float().clamp(min=AMAX_FLOOR)
    spread = (rows.max() / rows.min()).item()
    if spread <= policy.max_spread:
        return WeightChoice(PER_TENSOR, f"weight rows within {spread:.0f}x")
    return WeightChoice(PER_CHANNEL, f"weight rows {spread:.0f}x apart")


@dataclass
class CalibrationTally:
    """The learnt scales of one model's layers: what they decided (logged once all have), and the model-level
    bookkeeping for layers that run inside a compiled graph."""

    started: int = 0
    decisions: list[str] = field(default_factory=list)
    states: list[RuntimeActivationScale] = field(default_factory=list)
    model_calls: int = 0
    _pending: tuple[object, torch.Tensor, list[RuntimeActivationScale]] | None = None

    def record(self, reason: str) -> None:
        self.decisions.append(reason)
        if len(self.decisions) == self.started:
            logger.info("fp8 activation scales after calibration: %s", count_labels(self.decisions))

    def after_model_call(self) -> None:
        """Once per model call, outside ``torch.compile``: layers still observing that never ran eagerly (their
        calls counted 0) decide together, from one non-blocking copy of all their statistics."""
        self.model_calls += 1
        if self._pending is None:
            waiting = [state for state in self.states if state.phase == OBSERVING and state.calls == 0]
            if not waiting or self.model_calls < waiting[0].policy.calls or waiting[0].history is None:
                return
            values = torch.cat([torch.cat([s.history, s.spread, s.overshoot]) for s in waiting])
            self._pending = (*_copy_to_host(values), waiting)
            return
        event, host, waiting = self._pending
        if event is not None and not event.query():
            return
        self._pending = None
        for state, (amax, spread, overshoot) in zip(waiting, host.view(-1, 3).tolist()):
            state.decide(amax, spread, overshoot)


def lower_decile(values: torch.Tensor) -> torch.Tensor:
    """``torch.quantile(values, 0.1)`` of a 1-D tensor of two or more values (linear interpolation), by sorting and
    integer arithmetic on its length: torch.compile of torch 2.11 cannot trace ``torch.quantile`` with a symbolic
    length (2.14 can), which a DiT's linears get once they have seen two token counts."""
    ordered = values.sort().values
    span = values.shape[0] - 1
    low = span // 10
    fraction = (span - 10 * low) / 10  # 0.1 * span - low
    return ordered[low] + (ordered[low + 1] - ordered[low]) * fraction


def _copy_to_host(values: torch.Tensor) -> tuple[object, torch.Tensor]:
    """A copy of ``values`` on the host that does not make the host wait: (event to poll, host tensor)."""
    if values.device.type != "cuda":
        return None, values.detach().clone()
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return event, host


class RuntimeActivationScale:
    """One layer's activation quantizer whose scale is learnt while it runs; see the module docstring for the phases.

    It has a quantizer's call shape, ``x -> (x_fp8, scale)``, and goes in ``Fp8LinearParams.activation_quantizer``:
    the layer's method hands every call to its kernel unchanged. ``kernels``: the layer's kernels by device (the
    dict of its ``layer_state``); when the layer decides on a static scale, the per-tensor kernels made for it
    (``use_static_kernel``) replace the dynamic ones there, outside any compiled region."""

    def __init__(
        self,
        policy: ScalePolicy,
        may_stay_dynamic: bool,
        tally: CalibrationTally,
        name: str = "",
        group: GroupShape = PER_TOKEN,
        kernels: dict | None = None,
    ) -> None:
        self.policy = policy
        self.may_stay_dynamic = may_stay_dynamic
        self.tally = tally
        self.name = name
        self.phase = OBSERVING
        self.reason = ""
        self.calls = 0
        self.history: torch.Tensor | None = None  # float32 [1] on the compute device: the largest |x| seen
        self.spare: torch.Tensor | None = None  # the fused kernel's second history buffer
        self.spread: torch.Tensor | None = None  # float32 [1]: the largest token spread seen
        self.scale: torch.Tensor | None = None  # float32 [1]: the static scale of the last call
        self.overshoot: torch.Tensor | None = None  # float32 [1]: largest amax / static range seen (> 1: clamped)
        self._dynamic_quant = QuantFP8(False, group)
        self._static_quant = QuantFP8(True, PER_TENSOR)
        self.kernels = kernels if kernels is not None else {}
        self._static_kernels: dict = {}
        self._pending: tuple[object, torch.Tensor] | None = None
        self._warned = False
        tally.started += 1
        tally.states.append(self)

    def use_static_kernel(self, device: torch.device, kernel) -> None:
        """The kernel for ``device`` once the scale is static (it is made now, outside any compiled trace)."""
        self._static_kernels[device] = kernel
        if self.phase == STATIC:
            self.kernels[device] = kernel

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This call's activations in fp8 and their scale, by the phase; then the host bookkeeping (never inside
        ``torch.compile``: there ``CalibrationTally.after_model_call`` does it once per model call)."""
        compiling = torch.compiler.is_compiling()
        phase = self.phase
        if phase == STATIC:
            out = self.quantize_static(x)
        elif phase == DYNAMIC:
            out = self._dynamic_quant(x)
        elif compiling and self.history is None:  # no new state inside a compiled graph: dynamic there
            return self._dynamic_quant(x)
        else:
            if not compiling:
                self.buffers_on(x.device)
            out = self._observe(x)
        if not compiling:
            self.after_call()
        return out

    def bind(
        self, x_dtype: torch.dtype, cols: int, device: torch.device, row_scales: bool = False, launcher=None,
        scratch: bool = False,
    ) -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
        """This quantizer in its current phase for one layer's rows on ``device``, as a prepared call runs it
        (``QuantFP8.bind`` says what is bound, and what ``launcher`` and ``scratch`` are); ``None`` while observing
        (a few calls: the general path runs them), or where ``launcher`` is given and the phase would not launch the
        row kernel. The phase's kernel is bound too, so a prepared call checks ``phase`` to know it still holds."""
        if self.phase == OBSERVING or self.history is None or self.history.device != device:
            return None
        if self.phase == DYNAMIC:
            dynamic = self._dynamic_quant.bind(x_dtype, cols, device, row_scales=row_scales, launcher=launcher,
                                               scratch=scratch)  # fmt: skip
            if dynamic is None:
                return None

            def quantize_dynamic(x: torch.Tensor, *more) -> tuple[torch.Tensor, torch.Tensor]:
                out = dynamic(x, *more)
                self.after_call()
                return out

            return quantize_dynamic
        launch = self._static_quant.bind_running(x_dtype, cols, device, self.policy.margin, row_scales, launcher,
                                                 scratch)  # fmt: skip
        if launch is None and launcher is not None:
            return None

        def quantize_static(x: torch.Tensor, *more) -> tuple[torch.Tensor, torch.Tensor]:
            if launch is not None and x.shape[0]:
                x_fp8, scales = launch(x, (self.scale, self.history, self.spare, self.overshoot), *more)
                self.history, self.spare = self.spare, self.history
                scale = scales if row_scales else self.scale.reshape(())
            else:
                x_fp8, scale = self.quantize_static(x)
                scale = as_row_scales(scale, x.shape[0]) if row_scales else scale
            self.after_call()
            return x_fp8, scale

        return quantize_static

    def buffers_on(self, device: torch.device) -> None:
        if self.history is None or self.history.device != device:
            self.history, self.spare, self.spread, self.scale, self.overshoot = (
                torch.zeros(1, dtype=torch.float32, device=device) for _ in range(5)
            )

    def _observe(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Observing calls: dynamic per-token scales (amax / 448 each), recorded."""
        x_fp8, x_scale = self._dynamic_quant(x)
        rows = x_scale.detach().reshape(-1).float()
        peak = rows.max()
        torch.maximum(self.history, (peak * _E4M3_MAX).reshape(1), out=self.history)
        quiet = lower_decile(rows) if rows.numel() > 1 else peak
        torch.maximum(self.spread, (peak / quiet).reshape(1), out=self.spread)
        return x_fp8, x_scale

    def quantize_static(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Static calls: one pass, the scale from the history; the history follows this call's amax."""
        x_fp8, scale, history = self._static_quant.running(
            x, self.history, self.spare, self.scale, self.overshoot, self.policy.margin
        )
        if history is not self.history:
            self.history, self.spare = history, self.history
        return x_fp8, scale

    def static_input_scale(self) -> torch.Tensor | None:
        """The static scale this layer's activations call for (``margin * amax / 448`` over every call seen, whatever
        phase it chose), for a file's ``input_scale``; ``None`` before its first call."""
        if self.history is None or not bool(self.history.max() > 0):
            return None
        return (self.history.detach().float().max() * (self.policy.margin / _E4M3_MAX)).cpu().reshape(())

    def after_call(self) -> None:
        """Host bookkeeping after a call (never inside ``torch.compile``): decide, or check for clamping."""
        self.calls += 1
        if self.phase == OBSERVING and self.calls >= self.policy.calls:
            values = self._poll()
            if values is not None:
                self.decide(*values)
        elif self.phase == STATIC and self.calls % self.policy.check_every == 0 and not self._warned:
            values = self._poll()
            if values is not None:
                self._check_range(values[0], values[2])

    def _poll(self) -> tuple[float, ...] | None:
        """(amax, spread, overshoot) from the device without waiting for it: the copy is requested once, read once
        it is done."""
        if self.history.is_cuda and torch.cuda.is_current_stream_capturing():
            return None  # a CUDA-graph capture (``step_graphs``) runs this call once: no copy or event query in it
        if self._pending is None:
            event, host = _copy_to_host(torch.cat([self.history, self.spread, self.overshoot]))
            if event is None:
                return tuple(host.tolist())
            self._pending = (event, host)
            return None
        event, host = self._pending
        if not event.query():
            return None
        self._pending = None
        return tuple(host.tolist())

    def decide(self, amax: float, spread: float, _overshoot: float) -> None:
        if self.may_stay_dynamic and spread > self.policy.max_spread:
            self.phase, self.reason = DYNAMIC, "dynamic per-token (outlier tokens)"
        else:
            self.phase, self.reason = STATIC, "static per-tensor (calibrated)"
            self.kernels.update(self._static_kernels)
        logger.debug("%s: activations amax %.3g, token spread %.0fx -> %s", self.name, amax, spread, self.reason)
        self.tally.record(self.reason)

    def _check_range(self, amax: float, overshoot: float) -> None:
        if overshoot > 1.0:
            self._warned = True
            logger.info(
                "%s: activations reached %.3g, %.2fx past the static fp8 range of a call; that call was clamped "
                "and the scale has followed",
                self.name,
                amax,
                overshoot,
            )
