"""The fallback that runs anywhere: dequantize the weight, then an ordinary matmul.

Activations stay in high precision here (weight-only), which is more accurate and costs nothing, unless the layer
asks for ``round_activations_on_dequant``: then the base class quantizes them as the fp8 kernels would and this
kernel multiplies their dequantized values, so a model gives an FP8 GPU's outputs on a CPU or a pre-Ada GPU up to
rounding. Weight-only configs (activation scheme "none") only ever run here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..fp8_utils import dequantize
from ..params import Fp8LinearParams
from .base import _FLOAT_DTYPES, FP8ScaledMMLinearKernel, FP8ScaledMMLinearLayerConfig


class DequantLinearKernel(FP8ScaledMMLinearKernel):
    name = "dequant"

    def __init__(self, config: FP8ScaledMMLinearLayerConfig, device: torch.device) -> None:
        super().__init__(config, device)
        if not config.round_activations_on_dequant:
            self.input_quant = None

    @classmethod
    def is_supported(cls, device: torch.device, forced: bool = False) -> tuple[bool, str | None]:
        return True, None

    @classmethod
    def can_implement(cls, config: FP8ScaledMMLinearLayerConfig) -> tuple[bool, str | None]:
        return True, None

    def matmul(
        self, x: Tensor, x_scale: Tensor | None, params: Fp8LinearParams, bias: Tensor | None, out_dtype: torch.dtype
    ) -> tuple[Tensor, bool]:
        compute_dtype = out_dtype if x_scale is not None or x.dtype not in _FLOAT_DTYPES else x.dtype
        weight = dequantize(params.weight, params.weight_scale, compute_dtype, params.weight_group)
        if x_scale is not None:
            x = dequantize(x, x_scale, compute_dtype, self.config.activation_quant_key.group_shape)  # type: ignore[union-attr]
        else:
            x = x.to(compute_dtype)
        return F.linear(x, weight, bias.to(compute_dtype) if bias is not None else None), True
