"""Replay a diffusion model's steps as CUDA graphs where that is safe: the host cost of a step, paid once.

Why: on a fast GPU a short problem (a 512 px image, a small video model, few-step distilled models) spends its
step launching kernels. Every fp8 linear costs the host more than a 16-bit one does (an activation quantization
beside the GEMM), so fp8 can lose to bf16 there although its GEMMs are faster (bench/NOTES.md has the figures). A
graph records the step's kernels once and replays them with one launch. Sampling repeats the same shapes step after
step (and the cond + uncond batch of every step), which is what makes this pay.

When a step may replay (each call checks; otherwise it runs eagerly and ``StepGraphs.reason`` says why):
- the model's inputs are on a CUDA device, no gradients, not inside ``torch.compile``;
- every parameter and buffer is on that device at the address it had when captured (a LoRA patch, a move or an
  offload gives new graphs or an eager step) and no layer carries per-call weight functions (lowvram);
- no layer is still learning its activation scale (``auto_scales``: a learning layer's Python decides its phase,
  which a replay would not run), so graphs are captured after calibration;
- the caller found nothing else running inside the model (``refused``: the ComfyUI glue passes other nodes'
  wrappers and patches, whose Python a replay would skip);
- the inputs repeat: a step whose inputs differ at every call gives up until ``finish``.
A replay skips the per-call Python of the layers too: the clamping check of static activation scales is not logged
during replays, and their scale stays where calibration put it for the run. ``finish`` (end of a sampling run)
drops the graphs, so their memory goes back before the decoder runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from torch import nn

from .auto_scales import OBSERVING
from .cuda_graphs import GraphedForward
from .layer_state import fp8_layers

logger = logging.getLogger(__name__)

MAX_STEP_GRAPHS = 4  # signatures of one run kept at once: the CFG batch, a split cond/uncond pair, a last step
MAX_CAPTURES_IN_A_ROW = 3  # calls in a row that each needed a new graph before the run gives up on graphs


class StepGraphs:
    """A diffusion model's step graphs: ``run(forward, args, kwargs)`` in place of ``forward(*args, **kwargs)``."""

    def __init__(self, model: nn.Module, max_graphs: int = MAX_STEP_GRAPHS) -> None:
        self.model = model
        self.graphed = GraphedForward(
            model, None, max_graphs, ready=self._calibrating, max_captures_in_a_row=MAX_CAPTURES_IN_A_ROW
        )
        self._learning: list | None = None  # activation quantizers still observing (made at the first call)
        self.calls = 0
        self.reasons: dict[str, int] = {}  # why calls of this run ran eagerly, with their counts
        self.last_run: dict = {}  # the finished run's counts and summary line (what ``finish`` logged)

    def run(self, forward: Callable[..., Any], args: tuple, kwargs: dict, refused: str | None = None) -> Any:
        """One step: eager with the reason where ``refused`` or a check above says so, else captured or replayed."""
        self.calls += 1
        if refused is not None:
            self._note(refused)
            return forward(*args, **kwargs)
        graphed = self.graphed
        replays, captures = graphed.replays, graphed.captures
        out = graphed.run(forward, *args, **kwargs)
        if graphed.replays == replays and graphed.captures == captures:
            self._note(graphed.reason or "it could not be captured")
        return out

    def _note(self, reason: str) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def _calibrating(self) -> str | None:
        """Why not to capture yet: layers still learning their activation scales."""
        if self._learning is None:
            states = (module.fp8.activation for _, module in fp8_layers(self.model))
            self._learning = [state for state in states if state is not None]
        # A layer that has not run (a branch this model's inputs do not take) has nothing to learn yet.
        self._learning = [state for state in self._learning if state.phase == OBSERVING and state.calls]
        if self._learning:
            return f"{len(self._learning)} layer(s) are still calibrating their activation scales"
        return None

    def summary(self) -> str:
        """One line on this run: how many steps replayed, and why the others did not."""
        graphed = self.graphed
        if not self.calls:
            return "CUDA graphs: no step ran"
        replayed = graphed.replays
        line = f"CUDA graphs: {replayed} of {self.calls} model calls replayed"
        if graphed.captures:
            line += f" ({graphed.captures} captured)"
        eager = {reason: n for reason, n in self.reasons.items() if "calibrating" not in reason}
        if eager:
            main = max(eager, key=eager.get)
            line += f"; eager where {main}"
        return line

    def finish(self) -> str:
        """The end of a sampling run: the run's summary; graphs and counts dropped (the next run captures anew)."""
        line = self.summary()
        graphed = self.graphed
        self.last_run = {"calls": self.calls, "replays": graphed.replays, "captures": graphed.captures,
                         "eager": dict(self.reasons), "summary": line}  # fmt: skip
        self.graphed.drop()
        self.graphed.replays = self.graphed.captures = 0
        self.calls, self.reasons, self._learning = 0, {}, None
        return line


__all__ = ["MAX_CAPTURES_IN_A_ROW", "MAX_STEP_GRAPHS", "StepGraphs"]
