"""The kernel contract: what a layer needs (``FP8ScaledMMLinearLayerConfig``), whether a device and a layer can be
served (``is_supported`` / ``can_implement``, each with the reason when not), and the product itself.

The base class does everything around the product, once: inputs of any rank to rows and back, the tensors onto
the input's device, activation quantization, the bias where the kernel did not fuse it, and the output dtype. A
kernel implements only ``matmul``. Every kernel reads the same ``Fp8LinearParams``, so the choice can change per
device at forward time (ComfyUI builds models on the CPU and moves them to the GPU later) without touching the
weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..params import Fp8LinearParams
from ..prepared import Product, general_product
from ..quant_fp8 import QuantFP8
from ..scheme import GroupShape, QuantKey

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Why an fp8 GEMM passes over a weight-only layer (one wording, so a summary names it once for every such kernel).
WEIGHT_ONLY_REASON = "weight-only (activations stay in high precision)"
# Why mxfp8 layers (ComfyUI 0.30) run on the dequantize kernel, wherever a GEMM kernel is asked.
MX_REASON = (
    "mxfp8 weights (groups of 32, power-of-two scales) need an MX GEMM (Blackwell GPUs, capability 10.0+, "
    "torch 2.10+), which this pack does not drive: they are dequantized"
)


@dataclass(frozen=True)
class FP8ScaledMMLinearLayerConfig:
    """What a kernel needs to know about one layer to decide whether it can run it."""

    weight_quant_key: QuantKey
    activation_quant_key: QuantKey | None
    in_features: int
    out_features: int
    out_dtype: torch.dtype | None = None
    round_activations_on_dequant: bool = False

    def describe(self) -> str:
        acts = str(self.activation_quant_key) if self.activation_quant_key else "weight-only"
        return f"[{self.out_features}x{self.in_features}] weights {self.weight_quant_key}; activations {acts}"


class FP8ScaledMMLinearKernel(ABC):
    """One way to compute ``x @ dequant(weight).T + bias`` for an fp8 layer."""

    name: ClassVar[str]

    def __init__(self, config: FP8ScaledMMLinearLayerConfig, device: torch.device) -> None:
        """Made once per layer scheme and device, outside ``torch.compile`` (anything device-specific a kernel needs
        to know, it finds out here, not in the forward)."""
        self.config = config
        self.device = device
        key = config.activation_quant_key
        self.input_quant = QuantFP8.from_key(key) if key is not None else None

    @classmethod
    @abstractmethod
    def is_supported(cls, device: torch.device, forced: bool = False) -> tuple[bool, str | None]:
        """Whether this kernel runs on ``device`` at all (``forced``: the user asked for it, so a device where it
        runs but is not the fastest choice, such as the CPU for ``_scaled_mm``, is fine)."""

    @classmethod
    @abstractmethod
    def can_implement(cls, config: FP8ScaledMMLinearLayerConfig) -> tuple[bool, str | None]:
        """``(True, None)`` if this kernel can multiply this layer's scheme and shape, else ``(False, reason)``."""

    @abstractmethod
    def matmul(
        self, x: Tensor, x_scale: Tensor | None, params: Fp8LinearParams, bias: Tensor | None, out_dtype: torch.dtype
    ) -> tuple[Tensor, bool]:
        """``x`` [M, K] (fp8 with ``x_scale`` where the config quantizes activations, else high precision) times the
        weight; returns ``(out [M, N], bias_applied)``. The output may be in another float dtype than ``out_dtype``
        where the hardware allows only that; the base class casts."""

    def apply(self, params: Fp8LinearParams, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's output for ``x`` of shape ``[..., K]``: ``[..., N]`` in the output dtype."""
        out_dtype = self.output_dtype(x)
        rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        params = params.to(x.device)
        if bias is not None and (bias.device != x.device or bias.dtype != out_dtype):
            # A bias in the output dtype is fused into the GEMM; a bf16 bias on an fp16 model would cost an extra
            # pass over the whole output instead of this N-element cast.
            bias = bias.to(x.device, out_dtype, non_blocking=True)
        if self.input_quant is None:
            x_scale = None
        elif params.activation_quantizer is not None:
            rows, x_scale = params.activation_quantizer(rows)
        else:
            rows, x_scale = self.input_quant(rows, params.input_scale)
        out, bias_applied = self.matmul(rows, x_scale, params, bias, out_dtype)
        # Each skipped no-op saves a dispatcher round trip: small-M layers (text encoders) are host-bound.
        if bias is not None and not bias_applied:
            out = out + bias.to(out.dtype)
        if out.dtype != out_dtype:
            out = out.to(out_dtype)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])

    def prepare(
        self,
        weight_scale: Tensor,
        input_scale: Tensor | None,
        weight_group: GroupShape,
        activation_quantizer,
        bias: Tensor | None,
        x: Tensor,
    ) -> Product | None:
        """The product for inputs like ``x`` (dtype, device, width) with these tensors, as a prepared call runs it
        (``prepared``): ``(x, weight) -> out``. The weight comes with each call (see ``prepared`` for why); a kernel
        that can bind more than the general ``apply`` does (``scaled_mm``) overrides this."""
        return general_product(self.apply, weight_scale, input_scale, weight_group, activation_quantizer, bias)

    def bind_quantizer(
        self, input_scale: Tensor | None, activation_quantizer, x: Tensor, row_scales: bool, launcher=None,
        scratch: bool = False,
    ) -> Callable[..., tuple[Tensor, Tensor]] | None:
        """The activation quantizer ``apply`` would run, bound to this layer's rows (``QuantFP8.bind``, which says
        what ``launcher`` and ``scratch`` are); ``None`` where it has no bound form now (a learnt scale still
        observing)."""
        if self.input_quant is None:
            return None
        if activation_quantizer is not None:
            return activation_quantizer.bind(x.dtype, x.shape[-1], x.device, row_scales, launcher, scratch)
        return self.input_quant.bind(x.dtype, x.shape[-1], x.device, input_scale, row_scales, launcher, scratch)

    def output_dtype(self, x: torch.Tensor) -> torch.dtype:
        if self.config.out_dtype is not None:
            return self.config.out_dtype
        return x.dtype if x.dtype in _FLOAT_DTYPES else torch.bfloat16
