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
A model whose whole step cannot be captured (its forward copies a tensor made on the host to the GPU, as Wan's
time embedding does: a copy that waits for the host, which a capture refuses) replays block by block instead: each
transformer block (a child of the ``nn.ModuleList`` that holds the quantized layers) gets graphs of its own, in one
memory pool (they replay in the order they were captured), while the few operations around the blocks run eagerly.
The blocks' graphs are installed for the step only, so nothing of them is left on the model between steps.
A replay skips the per-call Python of the layers too: the clamping check of static activation scales is not logged
during replays, and their scale stays where calibration put it for the run. ``finish`` (end of a sampling run)
drops the graphs, so their memory goes back before the decoder runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .auto_scales import OBSERVING
from .block_replay import transformer_blocks
from .cuda_graphs import GraphedForward
from .layer_state import fp8_layers

logger = logging.getLogger(__name__)

MAX_STEP_GRAPHS = 4  # signatures of one run kept at once: the CFG batch, a split cond/uncond pair, a last step
MAX_CAPTURES_IN_A_ROW = 3  # calls in a row that each needed a new graph before the run gives up on graphs
# Block by block, each block's graph holds its inputs and outputs: at most this share of the GPU's memory, and this
# many bytes, for all of them (beyond that a step is large enough to keep the GPU busy without graphs).
BLOCK_GRAPHS_MEMORY_SHARE, MAX_BLOCK_GRAPHS_BYTES = 0.1, 2 << 30
# A block whose inputs pass this (a 480p clip on a 14B-wide model) keeps the GPU busy for longer than its launches
# take: its graph would add a copy of its inputs and gain nothing (bench/NOTES.md, step graphs).
MAX_BLOCK_INPUT_BYTES = 64 << 20


class StepGraphs:
    """A diffusion model's step graphs: ``run(forward, args, kwargs)`` in place of ``forward(*args, **kwargs)``."""

    def __init__(self, model: nn.Module, max_graphs: int = MAX_STEP_GRAPHS) -> None:
        self.model = model
        self.graphed = GraphedForward(
            model, None, max_graphs, ready=self._calibrating, max_captures_in_a_row=MAX_CAPTURES_IN_A_ROW
        )
        self._learning: list | None = None  # activation quantizers still observing (made at the first call)
        self.blocks: list[tuple[nn.Module, GraphedForward]] | None = None  # block by block, once the whole failed
        self._pool = None  # the blocks' one memory pool
        self._held = 0  # bytes the blocks' graphs hold in their inputs and outputs
        self.calls = 0
        self.reasons: dict[str, int] = {}  # why calls of this run ran eagerly, with their counts
        self.last_run: dict = {}  # the finished run's counts and summary line (what ``finish`` logged)
        self.block_replays = 0  # steps of this run whose every block replayed

    def run(self, forward: Callable[..., Any], args: tuple, kwargs: dict, refused: str | None = None) -> Any:
        """One step: eager with the reason where ``refused`` or a check above says so, else captured or replayed."""
        self.calls += 1
        if refused is not None:
            self._note(refused)
            return forward(*args, **kwargs)
        graphed = self.graphed
        if graphed.disabled and self.blocks != []:
            return self._run_blocks(forward, args, kwargs)
        replays, captures = graphed.replays, graphed.captures
        out = graphed.run(forward, *args, **kwargs)
        if graphed.replays == replays and graphed.captures == captures:
            self._note(graphed.reason or "it could not be captured")
        return out

    def _run_blocks(self, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """The step with each transformer block replayed from graphs of its own (the whole step cannot be)."""
        if self.blocks is None:
            layers = dict(fp8_layers(self.model))
            self.blocks = [
                (block, GraphedForward(block, block.forward, ready=self._calibrating,
                                       max_captures_in_a_row=MAX_CAPTURES_IN_A_ROW, may_hold=self._may_hold))
                for block in transformer_blocks(self.model, layers)
            ]  # fmt: skip
            if not self.blocks:
                self._note(self.graphed.failure)
                return forward(*args, **kwargs)
        if self._pool is None and torch.cuda.is_available():
            self._pool = torch.cuda.graph_pool_handle()
        before = [(graphed.replays, graphed.captures) for _, graphed in self.blocks]
        for block, graphed in self.blocks:
            graphed.pool = graphed.pool or self._pool
            block.forward = graphed
        try:
            out = forward(*args, **kwargs)
        finally:
            for block, _ in self.blocks:
                del block.forward
        counts = [(graphed.replays, graphed.captures) for _, graphed in self.blocks]
        if all(now[0] > then[0] for now, then in zip(counts, before)):
            self.block_replays += 1
        elif not any(now != then for now, then in zip(counts, before)):
            reasons = [graphed.reason for _, graphed in self.blocks if graphed.reason]
            self._note(reasons[0] if reasons else "its blocks could not be captured")
        return out

    def _may_hold(self, nbytes: int) -> bool:
        """Whether one more block graph may hold ``nbytes`` (see ``MAX_BLOCK_GRAPHS_BYTES``)."""
        limit = MAX_BLOCK_GRAPHS_BYTES
        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            limit = min(limit, int(BLOCK_GRAPHS_MEMORY_SHARE * total))
        reason = None
        if nbytes // 2 > MAX_BLOCK_INPUT_BYTES:
            reason = "its blocks' inputs are large (the GPU, not the launches, sets the pace of such a step)"
        elif self._held + nbytes > limit:
            reason = "its block graphs would hold more GPU memory than allowed (a large step)"
        if reason is not None:
            for _, graphed in self.blocks or []:  # all blocks or none: a step half replayed gains little
                graphed.gave_up = reason
                graphed.graphs.clear()
            return False
        self._held += nbytes
        return True

    def _note(self, reason: str) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def _calibrating(self) -> str | None:
        """Why not to capture yet: a run's first call (it shows which layers run: one that has not run since the
        model was loaded, a branch these inputs do not take, has nothing to learn), or layers that ran and are still
        learning their activation scales."""
        if self.calls <= 1:
            return "the layers are calibrating their activation scales (first call)"
        if self._learning is None:
            states = (module.fp8.activation for _, module in fp8_layers(self.model))
            self._learning = [state for state in states if state is not None]
        self._learning = [state for state in self._learning if state.phase == OBSERVING and state.calls]
        if self._learning:
            return f"{len(self._learning)} layer(s) are still calibrating their activation scales"
        return None

    def summary(self) -> str:
        """One line on this run: how many steps replayed, and why the others did not."""
        graphed = self.graphed
        if not self.calls:
            return "CUDA graphs: no step ran"
        if self.blocks:
            line = f"CUDA graphs: {self.block_replays} of {self.calls} model calls replayed block by block "
            line += f"({len(self.blocks)} blocks; the whole call could not be captured)"
        else:
            line = f"CUDA graphs: {graphed.replays} of {self.calls} model calls replayed"
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
        blocks = [block_graphs for _, block_graphs in self.blocks or []]
        self.last_run = {
            "calls": self.calls, "eager": dict(self.reasons), "summary": line,
            "replays": graphed.replays if not blocks else self.block_replays,
            "captures": graphed.captures if not blocks else max(g.captures for g in blocks),
            "block_by_block": bool(blocks), "failure": graphed.failure,
        }  # fmt: skip
        for every in (graphed, *blocks):
            every.drop()
            every.replays = every.captures = 0
        self._pool, self._held = None, 0
        self.calls, self.reasons, self._learning, self.block_replays = 0, {}, None, 0
        return line


__all__ = ["MAX_CAPTURES_IN_A_ROW", "MAX_STEP_GRAPHS", "StepGraphs"]
