"""Replay the blocks that run before a layer: the sensitivity pass computes only what one layer's fp8 copy changes.

Why: the sensitivity pass runs the model once per layer on the probe samples, with only that layer changed. Every
block that finishes before the layer's first call computes exactly what it computed in the reference run (same
inputs, same weights, nothing depends on the future), so its output can be handed back from a recording instead of
being computed again. For a layer in the middle of an encoder that skips about half the model; summed over all
layers, about half the pass.

What a "block" is needs no model knowledge: the children of the ``nn.ModuleList``s that hold the measured layers
(a transformer's layers). Which calls to hand back is measured, not assumed: the recording notes, per sample, how
many block calls had finished when each layer first ran. A model the recording cannot vouch for (a block called a
different number of times per sample, outputs too large to keep, no block lists) is run in full, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .calibration import Forward, Sample

logger = logging.getLogger(__name__)

# Recorded block outputs held at once (the probe samples are few and short; beyond this the pass runs in full).
MAX_RECORDED_BYTES = 2 << 30


class BlockReplay:
    """The block outputs of the probe samples' reference run, and for each layer how many block calls of each
    sample finish before it first runs. ``replaying(layer, forward)`` gives a forward that, called for the probe
    samples in order, hands those calls back."""

    def __init__(self, blocks: list[nn.Module], outputs: list[list[Any]], before: dict[str, list[int | None]]) -> None:
        self.blocks, self.outputs, self.before = blocks, outputs, before

    @classmethod
    def record(
        cls,
        model: nn.Module,
        layers: Mapping[str, nn.Module],
        samples: Sequence[Sample],
        forward: Forward,
        max_bytes: int = MAX_RECORDED_BYTES,
    ) -> BlockReplay | None:
        """Run ``samples`` once, keeping each block call's output; ``None`` where nothing can be replayed."""
        blocks = transformer_blocks(model, layers)
        if not blocks:
            return None
        outputs: list[list[Any]] = []
        before: dict[str, list[int | None]] = {name: [] for name in layers}
        state = {"calls": [], "bytes": 0, "depth": 0, "nested": False}

        def recording(original):
            def forward_(*args, **kwargs):
                state["nested"] |= state["depth"] > 0
                state["depth"] += 1
                try:
                    output = original(*args, **kwargs)
                finally:
                    state["depth"] -= 1
                state["calls"].append(_detached(output))
                state["bytes"] += _nbytes(output)
                return output

            return forward_

        def first_call(name: str):
            def hook(_module: nn.Module, _args: tuple) -> None:
                if before[name][-1] is None:
                    before[name][-1] = len(state["calls"])

            return hook

        handles = [layers[name].register_forward_pre_hook(first_call(name)) for name in layers]
        try:
            with _wrapped(blocks, recording), torch.no_grad():
                for sample in samples:
                    state["calls"] = []
                    for counts in before.values():
                        counts.append(None)
                    forward(model, **sample)
                    outputs.append(state["calls"])
                    if state["bytes"] > max_bytes:
                        logger.info("fp8 sensitivity: block outputs over %d MiB; layers run in full", max_bytes >> 20)
                        return None
        finally:
            for handle in handles:
                handle.remove()
        if state["nested"]:
            logger.info("fp8 sensitivity: blocks call one another; layers run in full")
            return None
        return cls(blocks, outputs, before)

    def saved_share(self) -> float:
        """The share of block calls the sensitivity pass hands back instead of computing (for the log)."""
        total = sum(len(calls) for calls in self.outputs) * len(self.before)
        handed = sum(sum(c for c in counts if c is not None) for counts in self.before.values())
        return handed / total if total else 0.0

    @contextmanager
    def replaying(self, layer: str, forward: Forward) -> Iterator[Forward]:
        """A forward that runs the probe samples, in order, with the block calls that finish before ``layer``
        first runs handed back from the recording (a sample the layer never ran in is computed in full)."""
        counts = self.before.get(layer) or [None] * len(self.outputs)
        position = {"sample": -1, "call": 0}

        def replayed(original):
            def forward_(*args, **kwargs):
                sample, call = position["sample"], position["call"]
                position["call"] += 1
                if 0 <= sample < len(counts) and counts[sample] is not None and call < counts[sample]:
                    return _cloned(self.outputs[sample][call])
                return original(*args, **kwargs)

            return forward_

        def counted(model: nn.Module, **sample: Any) -> Any:
            position["sample"] += 1
            position["call"] = 0
            return forward(model, **sample)

        with _wrapped(self.blocks, replayed):
            yield counted


def transformer_blocks(model: nn.Module, layers: Mapping[str, nn.Module]) -> list[nn.Module]:
    """The children of every ``nn.ModuleList`` that holds measured layers in two or more of its children, outermost
    lists only (a list nested inside a chosen block is part of that block)."""
    measured = {id(module) for module in layers.values()}
    chosen: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside or not isinstance(module, nn.ModuleList):
            continue
        holding = [child for child in module if any(id(m) in measured for m in child.modules())]
        if len(holding) >= 2:
            chosen.extend(module)
            inside.update(id(m) for child in module for m in child.modules())
    return chosen


@contextmanager
def _wrapped(blocks: list[nn.Module], wrapper) -> Iterator[None]:
    """Each block's ``forward`` replaced on the instance by ``wrapper(original)``, and put back afterwards."""
    previous = [block.__dict__.get("forward") for block in blocks]
    for block in blocks:
        block.forward = wrapper(block.forward)
    try:
        yield
    finally:
        for block, old in zip(blocks, previous):
            if old is None:
                del block.forward
            else:
                block.forward = old


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _nbytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(value))


def _map(value: Any, function) -> Any:
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, tuple):
        return (
            type(value)(*(_map(v, function) for v in value))
            if hasattr(value, "_fields")
            else tuple(_map(v, function) for v in value)
        )
    if isinstance(value, list):
        return [_map(v, function) for v in value]
    if isinstance(value, dict):
        return {k: _map(v, function) for k, v in value.items()}
    return value


def _detached(value: Any) -> Any:
    return _map(value, lambda t: t.detach().clone())


def _cloned(value: Any) -> Any:
    """A fresh copy each time: the model may write into a block's output in place (``x += ...``)."""
    return _map(value, torch.Tensor.clone)
