"""Per-layer sensitivity: how much the model's output moves when one layer alone runs in fp8, and which layers
to keep in high precision within a memory budget.

Why: the error of a text encoder's fp8 copy is not spread evenly; a few layers (often the last blocks' attention
outputs and values) cost much more than their share of the bytes. Measuring each layer's effect on the model's own
outputs, on sample inputs, and keeping the worst in high precision buys the most accuracy for the bytes. The table
is also what a person reads to see where fp8 hurts (``python -m fp8_quant sensitivity`` plots it).
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .block_replay import BlockReplay
from .calibration import Forward, Sample, output_error, run_samples
from .fp8_utils import dequantize, quantize_input_dynamic

logger = logging.getLogger(__name__)


@dataclass
class LayerSensitivity:
    """``error``: relative error of the model's outputs on the samples with only this layer in fp8."""

    name: str
    error: float
    numel: int
    fp8_bytes: int = 0  # the layer's fp8 weight and scales
    kept: bool = False


@dataclass
class SensitivityReport:
    layers: list[LayerSensitivity] = field(default_factory=list)
    budget: float = 0.0  # linear-weight bytes allowed, as a fraction of their bf16 bytes

    @property
    def kept(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.kept]

    def table(self, limit: int | None = None) -> str:
        """Layers by decreasing error: rank, error, share of the linear weights, where it goes."""
        ranked = sorted(self.layers, key=lambda layer: layer.error, reverse=True)
        total = sum(layer.numel for layer in self.layers) or 1
        width = max((len(layer.name) for layer in ranked), default=5)
        lines = [f"{'#':>3}  {'layer':{width}s}  {'error':>8}  {'weights':>7}  kept as"]
        for rank, layer in enumerate(ranked[:limit] if limit else ranked, 1):
            where = "bf16" if layer.kept else "fp8"
            lines.append(f"{rank:>3}  {layer.name:{width}s}  {layer.error:8.5f}  {layer.numel / total:7.2%}  {where}")
        if limit and len(ranked) > limit:
            lines.append(f"     ... {len(ranked) - limit} more layers, all fp8")
        return "\n".join(lines)

    def compact(self, limit: int = 3) -> str:
        """The most sensitive layers in one line, named without the prefix all layers share (for a node's summary;
        the whole table goes to the log)."""
        ranked = sorted(self.layers, key=lambda layer: layer.error, reverse=True)[:limit]
        common = _shared_prefix([layer.name for layer in self.layers]) if len(self.layers) > 1 else ""
        shown = ", ".join(
            f"{layer.name[len(common) + 1 :] if common else layer.name} {layer.error:.4f}"
            f"{' (bf16)' if layer.kept else ''}"
            for layer in ranked
        )
        return f"most sensitive layers (error alone in fp8): {shown}"

    def plot(self, path: str) -> None:
        """A PNG of each layer's error in model order, the layers kept in high precision marked (needs matplotlib)."""
        require_matplotlib()
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        errors = [layer.error for layer in self.layers]
        colors = ["tab:red" if layer.kept else "tab:blue" for layer in self.layers]
        figure, axes = plt.subplots(figsize=(max(8.0, 0.12 * len(errors)), 4.5))
        axes.bar(range(len(errors)), errors, color=colors)
        axes.set_yscale("log")
        axes.set_xlabel("linear layer (model order)")
        axes.set_ylabel("output rel. error, layer alone in fp8")
        kept = len(self.kept)
        axes.set_title(f"fp8 sensitivity per layer: {kept} kept in bf16 (red), budget {self.budget:.2f}x bf16 bytes")
        ticks = range(0, len(errors), max(1, len(errors) // 24))
        axes.set_xticks(list(ticks))
        axes.set_xticklabels([self.layers[i].name for i in ticks], rotation=90, fontsize=6)
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)


def require_matplotlib(subject: str = "the sensitivity plot", hint: str = "") -> None:
    """The plot's one optional dependency, checked where a caller can still stop before long work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(f"{subject} needs matplotlib (pip install matplotlib){hint}") from None


def measure_sensitivity(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    quantized: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    samples: Sequence[Sample],
    forward: Forward,
    references: list[list[torch.Tensor]],
    quantize_activations: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    replay: BlockReplay | None = None,
) -> list[LayerSensitivity]:
    """Each layer's output error with only it in fp8: its ``quantized`` weight (fp8 values, scale), and activations
    rounded per token as the fp8 product would where ``quantize_activations``. The layer's own parameters are not
    touched: a temporary forward computes with the dequantized weight. ``replay``: the blocks ahead of each layer
    handed back from the samples' reference run instead of computed (the same errors, about half the work)."""
    results = []
    for index, (name, module) in enumerate(layers.items()):
        fp8_weight, scale = quantized[name]
        with fake_fp8(module, fp8_weight, scale, quantize_activations), _replaying(replay, name, forward) as run:
            error = output_error(run_samples(model, samples, run), references)
        fp8_bytes = fp8_weight.numel() * fp8_weight.element_size() + scale.numel() * scale.element_size()
        results.append(LayerSensitivity(name, error, module.weight.numel(), fp8_bytes))
        if progress is not None:
            progress(index + 1, len(layers), name)
    return results


@contextlib.contextmanager
def _replaying(replay: BlockReplay | None, layer: str, forward: Forward) -> Iterator[Forward]:
    if replay is None:
        yield forward
    else:
        with replay.replaying(layer, forward) as run:
            yield run


def choose_kept(layers: list[LayerSensitivity], budget: float, other_bytes: int = 0, other_bf16_bytes: int = 0) -> None:
    """Mark the layers to keep in high precision (``kept``): most error per byte first, while all linear weights
    stay within ``budget`` times their bf16 bytes. A quantized layer costs its fp8 weight and scales, a kept one 2
    bytes a weight; the other linears (not measured: skipped, or fp8 without a choice) cost ``other_bytes`` of
    ``other_bf16_bytes``."""
    total_bf16 = 2 * sum(layer.numel for layer in layers) + other_bf16_bytes
    used = sum(layer.fp8_bytes for layer in layers) + other_bytes
    allowed = budget * total_bf16
    if used > allowed:
        logger.info("fp8: even with every candidate in fp8 the linears take %.2fx their bf16 bytes", used / total_bf16)
    for layer in sorted(layers, key=lambda item: item.error**2 / max(1, item.numel), reverse=True):
        extra = 2 * layer.numel - layer.fp8_bytes
        if used + extra <= allowed:
            layer.kept = True
            used += extra


class fake_fp8:
    """A context in which ``module`` computes with an fp8 weight (and fp8-rounded activations): an instance
    ``forward`` set and then removed, so the module's parameters and class stay as they are."""

    def __init__(self, module: nn.Module, fp8_weight: torch.Tensor, scale: torch.Tensor, activations: bool) -> None:
        self.module, self.weight, self.scale, self.activations = module, fp8_weight, scale, activations
        self.previous = module.__dict__.get("forward")

    def __enter__(self) -> None:
        cache: dict = {}

        def forward(module: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            weight = cache.get((x.device, x.dtype))
            if weight is None:
                weight = dequantize(self.weight.to(x.device), self.scale.to(x.device), x.dtype)
                cache[(x.device, x.dtype)] = weight
            if self.activations:
                x = dequantize(*quantize_input_dynamic(x), x.dtype)
            bias = module.bias.to(x.device, x.dtype) if module.bias is not None else None
            return F.linear(x, weight, bias)

        self.module.forward = types.MethodType(forward, self.module)

    def __exit__(self, *exc) -> None:
        if self.previous is None:
            del self.module.forward
        else:
            self.module.forward = self.previous


def _shared_prefix(names: list[str]) -> str:
    """The dotted components every name starts with ("transformer.encoder" of a T5's layers)."""
    shared: list[str] = []
    for parts in zip(*(name.split(".")[:-1] for name in names)):
        if len(set(parts)) != 1:
            break
        shared.append(parts[0])
    return ".".join(shared)
