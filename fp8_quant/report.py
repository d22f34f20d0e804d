"""What quantizing a model did, layer by layer: for logs, the node's summary and tests."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import Fp8Config

if TYPE_CHECKING:
    from .sensitivity import SensitivityReport


@dataclass
class LayerReport:
    name: str
    quantized: bool
    reason: str
    bytes_before: int
    bytes_after: int
    bf16_bytes: int = 0  # the weight's size in bf16: the yardstick of memory budgets
    held_dtype: torch.dtype | None = None  # what a kept layer's weight is held in (fp32 on a CPU, bf16 on a GPU, ...)
    number_format: str = "fp8"  # a quantized layer's: "fp8" or "int8" (``layer_format``)
    weight_scheme: str = ""  # a quantized layer's weights as they run ("fp8 e4m3, per-channel"), from its state


@dataclass
class Fp8Report:
    """One model's quantization, for logs and for the node's UI text."""

    config: Fp8Config
    layers: list[LayerReport] = field(default_factory=list)
    kernel_choice: str = ""
    activations_rounded: bool = True  # False where the chosen kernel keeps activations in high precision (dequantize)
    notes: list[str] = field(default_factory=list)  # what a recipe measured (e.g. the error on its samples)
    sensitivity: SensitivityReport | None = None  # the per-layer table, where a recipe measured one

    @property
    def quantized(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.quantized]

    @property
    def skipped(self) -> list[LayerReport]:
        return [layer for layer in self.layers if not layer.quantized]

    @property
    def bytes_before(self) -> int:
        return sum(layer.bytes_before for layer in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(layer.bytes_after for layer in self.layers)

    @property
    def bf16_bytes(self) -> int:
        return sum(layer.bf16_bytes for layer in self.layers)

    def formats(self) -> str:
        """The quantized layers' number format: "fp8", "int8", or "8 bits (20 fp8, 4 int8)" for a mixture."""
        counts: dict[str, int] = {}
        for layer in self.quantized:
            counts[layer.number_format] = counts.get(layer.number_format, 0) + 1
        if len(counts) <= 1:
            return next(iter(counts), "fp8")
        return f"8 bits ({', '.join(f'{count} {name}' for name, count in sorted(counts.items()))})"

    def headline(self) -> str:
        """Layers quantized and kept, and the bytes: the first thing a summary says."""
        skipped = count_labels(layer.reason for layer in self.skipped)
        kept_fp8 = count_labels(layer.reason for layer in self.quantized if layer.reason != "quantized")
        return (
            f"{self.formats()}: {len(self.quantized)}/{len(self.layers)} linears quantized"
            f"{f' ({kept_fp8})' if kept_fp8 else ''}"
            f"{f' (skipped: {skipped})' if skipped else ''}; {self.bytes_line()}"
        )

    def bytes_line(self) -> str:
        """The linear weights' bytes against bf16 (the yardstick: fp8 halves it), and what the kept layers are held
        in: on a CPU they are fp32, so fp8 plus kept layers can weigh more than the file's bf16 did."""
        text = f"linear weights {mib(self.bytes_after)} vs {mib(self.bf16_bytes)} in bf16"
        held = sorted({dtype_name(layer.held_dtype) for layer in self.skipped if layer.held_dtype is not None})
        if held:
            text += f" (kept layers in {', '.join(held)})"
        return text

    def short_summary(self) -> str:
        """What a node shows: how many linears are fp8, the bytes, the kernel, in plain words (the patterns that kept
        layers, the scheme and the kernel's reasoning are in ``summary``, for the log)."""
        kept = len(self.skipped)
        text = f"{len(self.quantized)} of {len(self.layers)} linears in {self.formats()}"
        if kept:
            text += f" ({kept} kept as they were: norms, embeddings, heads and your skip list; names in the log)"
        text += f"; {self.bytes_line()}"
        if not self.activations_rounded and self.config.quantizes_activations:
            text += "; activations not rounded on this device"
        if self.kernel_choice:
            text += f"; kernel {self.kernel_choice.split(' ', 1)[0]}"
        return "; ".join([text, *self.notes])

    def kept_names(self) -> str:
        """The kept layers by reason, for the log."""
        by_reason: dict[str, list[str]] = {}
        for layer in self.skipped:
            by_reason.setdefault(layer.reason, []).append(layer.name)
        return "; ".join(f"{reason}: {', '.join(names)}" for reason, names in sorted(by_reason.items()))

    def ran_weights(self) -> str | None:
        """The weights' scheme as the quantized fp8 layers run it (by layer count where they differ), where that is
        not what the config names: a file's layers (an mxfp8 file says mxfp8, not "block 128x128"); ``None`` where
        the config says it (or chooses per layer, and says so)."""
        if not isinstance(self.config, Fp8Config) or self.config.weight_granularity is None:
            return None
        counts: dict[str, int] = {}
        for layer in self.quantized:
            if layer.number_format == "fp8" and layer.weight_scheme:
                counts[layer.weight_scheme] = counts.get(layer.weight_scheme, 0) + 1
        if not counts or set(counts) == {str(self.config.weight_quant_key)}:
            return None
        if len(counts) == 1:
            return next(iter(counts))
        return " / ".join(f"{scheme} ({n} layer{'s' if n > 1 else ''})" for scheme, n in sorted(counts.items()))

    def summary(self) -> str:
        text = f"{self.headline()}; {self.config.describe(self.activations_rounded, self.ran_weights())}"
        if self.kernel_choice:
            text += f"; kernel {self.kernel_choice}"
        return "; ".join([text, *self.notes])


def count_labels(labels: Iterable[str]) -> str:
    """ "2 a, 1 b": how many of each label, for one-line summaries."""
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    return ", ".join(f"{count} {label}" for label, count in sorted(counts.items()))


def tensor_bytes(tensor: torch.Tensor | None) -> int:
    return tensor.numel() * tensor.element_size() if tensor is not None else 0


def fp8_layer_bytes(module: nn.Module) -> int:
    """What a quantized linear's weight costs: the fp8 (or int8) weight plus its float32 scales."""
    return tensor_bytes(module.weight) + tensor_bytes(module.weight_scale)


def layer_format(module: nn.Module) -> str:
    """A quantized linear's number format, as reports name it."""
    return "int8" if module.weight.dtype == torch.int8 else "fp8"


def dtype_name(dtype: torch.dtype) -> str:
    """``bf16``, ``fp32``, ``float8_e4m3fn``: a dtype as a summary names it."""
    short = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    return short.get(dtype, str(dtype).removeprefix("torch."))


def bf16_bytes(tensor: torch.Tensor | None) -> int:
    return 2 * tensor.numel() if tensor is not None else 0


def mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"
