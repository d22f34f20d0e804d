"""The fallback that runs anywhere: dequantize the weight, then an ordinary matmul.

It keeps the numerics contract of the fp8 kernels: where the config quantizes activations, this kernel
quantizes and dequantizes them the same way, so a model gives the same outputs on a CPU, a pre-Ada GPU and an
H100 up to rounding. Weight-only configs (activation scheme "none") only ever run here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import FP8ScaledMMLinearKernel, FP8ScaledMMLinearLayerConfig, layer_tensors


class DequantLinearKernel(FP8ScaledMMLinearKernel):
    name = "dequant"

    @classmethod
    def can_implement(cls, config: FP8ScaledMMLinearLayerConfig, device: torch.device) -> tuple[bool, str | None]:
        return True, None

    def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out_dtype = self.output_dtype(x)
        compute_dtype = out_dtype if x.dtype not in (torch.bfloat16, torch.float16, torch.float32) else x.dtype
        weight, weight_scale, bias = layer_tensors(layer, x.device, bias)
        scale = weight_scale.reshape(-1, 1) if weight_scale.dim() else weight_scale
        dense_weight = weight.to(compute_dtype) * scale.to(compute_dtype)
        if self.input_quant is not None:
            x_fp8, x_scale = self.quantize_input(layer, x)
            x = (x_fp8.to(torch.float32) * x_scale).to(compute_dtype)
        else:
            x = x.to(compute_dtype)
        out = F.linear(x, dense_weight, bias.to(compute_dtype) if bias is not None else None)
        return out.to(out_dtype)
