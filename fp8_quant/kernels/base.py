"""The kernel contract: a layer config, ``can_implement`` that says why not, and ``apply_weights``.

Every kernel reads the same layer layout, so the choice can change per device at forward time (ComfyUI builds
models on the CPU and moves them to the GPU later) without touching the weights:

- ``layer.weight``: fp8 ``[N, K]`` contiguous. Passing ``weight.t()`` gives ``_scaled_mm`` the column-major
  ``[K, N]`` operand it wants, and the parameter keeps the ``nn.Linear`` shape that LoRA and state dicts expect.
- ``layer.weight_scale``: float32 ``[]`` (per tensor) or ``[N]`` (per output channel).
- ``layer.input_scale``: float32 ``[]`` for static activations, else ``None``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..quant_fp8 import QuantFP8
from ..scheme import QuantKey


@dataclass(frozen=True)
class FP8ScaledMMLinearLayerConfig:
    """What a kernel needs to know about one layer to decide whether it can run it."""

    weight_quant_key: QuantKey
    activation_quant_key: QuantKey | None
    in_features: int
    out_features: int
    out_dtype: torch.dtype | None = None

    def describe(self) -> str:
        acts = str(self.activation_quant_key) if self.activation_quant_key else "weight-only"
        return f"[{self.out_features}x{self.in_features}] weights {self.weight_quant_key}; activations {acts}"


class FP8ScaledMMLinearKernel(ABC):
    """One way to compute ``x @ dequant(weight).T + bias`` for an fp8 layer."""

    name: ClassVar[str]

    def __init__(self, config: FP8ScaledMMLinearLayerConfig) -> None:
        self.config = config
        key = config.activation_quant_key
        self.input_quant = QuantFP8.from_key(key) if key is not None else None

    @classmethod
    @abstractmethod
    def can_implement(cls, config: FP8ScaledMMLinearLayerConfig, device: torch.device) -> tuple[bool, str | None]:
        """``(True, None)`` if this kernel runs the layer on ``device``, else ``(False, reason)``."""

    @abstractmethod
    def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's output for ``x`` of shape ``[..., K]``: ``[..., N]`` in the output dtype."""

    def output_dtype(self, x: torch.Tensor) -> torch.dtype:
        if self.config.out_dtype is not None:
            return self.config.out_dtype
        return x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16

    def quantize_input(self, layer: torch.nn.Module, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.input_quant is not None
        input_scale = getattr(layer, "input_scale", None)
        if input_scale is not None and input_scale.device != x2d.device:
            input_scale = input_scale.to(x2d.device)
        return self.input_quant(x2d, input_scale)


def layer_tensors(
    layer: torch.nn.Module, device: torch.device, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The fp8 weight, its scale and the bias on ``device``: offloaded layers are streamed per call."""
    weight = layer.weight
    weight_scale = layer.weight_scale
    if weight.device != device:
        weight = weight.to(device, non_blocking=True)
    if weight_scale.device != device:
        weight_scale = weight_scale.to(device, non_blocking=True)
    if bias is not None and bias.device != device:
        bias = bias.to(device, non_blocking=True)
    return weight, weight_scale, bias
