"""``torch._scaled_mm`` kernels: per-tensor scales, and row-wise (per-token x per-channel) scales.

``_scaled_mm`` refuses some layers (K or N not a multiple of 16, e5m2 x e5m2); ``can_implement`` says so
up front so that selection falls back instead of the forward crashing.
"""

from __future__ import annotations

import functools

import torch

from ..fp8_utils import is_fp8_dtype
from .base import FP8ScaledMMLinearKernel, FP8ScaledMMLinearLayerConfig, layer_tensors


def _common_checks(config: FP8ScaledMMLinearLayerConfig, device: torch.device) -> str | None:
    if not hasattr(torch, "_scaled_mm"):
        return "this torch has no torch._scaled_mm"
    if device.type == "cuda":
        if torch.version.hip is not None:
            return "ROCm fp8 types differ (fnuz); not supported yet"
        index = device.index if device.index is not None else torch.cuda.current_device()
        capability = torch.cuda.get_device_capability(index)
        if capability < (8, 9):
            return f"GPU capability {capability[0]}.{capability[1]} has no FP8 tensor cores (needs 8.9+)"
    elif device.type != "cpu":
        return f"device type {device.type!r} has no _scaled_mm"
    if config.activation_quant_key is None:
        return "weight-only layers keep activations in high precision; _scaled_mm needs both operands in fp8"
    if not is_fp8_dtype(config.weight_quant_key.dtype):
        return f"weight dtype {config.weight_quant_key.dtype} is not fp8"
    if config.weight_quant_key.dtype == torch.float8_e5m2 and config.activation_quant_key.dtype == torch.float8_e5m2:
        return "e5m2 x e5m2 is not supported by _scaled_mm"
    if config.in_features % 16 or config.out_features % 16:
        return f"_scaled_mm needs in/out features divisible by 16, layer is {config.out_features}x{config.in_features}"
    return None


@functools.cache
def cpu_rowwise_supported() -> bool:
    """Whether this torch's CPU ``_scaled_mm`` takes row-wise scales (torch 2.13 does, 2.11 asserts)."""
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def _finish(out: torch.Tensor, x: torch.Tensor, out_dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
    # Each skipped no-op saves a dispatcher round trip: small-M layers (text encoders) are host-bound.
    if bias is not None:
        out = out + bias.to(out.dtype)
    if out.dtype != out_dtype:
        out = out.to(out_dtype)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])


class PerTensorScaledMMKernel(FP8ScaledMMLinearKernel):
    """Per-tensor weight and activation scales: the fastest ``_scaled_mm`` form, any output dtype."""

    name = "scaled_mm_tensor"

    @classmethod
    def can_implement(cls, config: FP8ScaledMMLinearLayerConfig, device: torch.device) -> tuple[bool, str | None]:
        reason = _common_checks(config, device)
        if reason:
            return False, reason
        if not config.weight_quant_key.per_tensor:
            return False, "weight scales are per-channel, not per-tensor"
        if not config.activation_quant_key.per_tensor:  # type: ignore[union-attr]
            return False, "activation scales are per-token, not per-tensor"
        return True, None

    def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out_dtype = self.output_dtype(x)
        x2d = _rows(x)
        weight, weight_scale, bias = layer_tensors(layer, x.device, bias)
        x_fp8, x_scale = self.quantize_input(layer, x2d)
        # CUDA refuses a fused bias with a float32 output.
        fused_bias = bias is not None and bias.dtype == out_dtype and out_dtype != torch.float32
        out = torch._scaled_mm(
            x_fp8,
            weight.t(),
            scale_a=x_scale.reshape(()),
            scale_b=weight_scale.reshape(()),
            bias=bias if fused_bias else None,
            out_dtype=out_dtype,
        )
        return _finish(out, x, out_dtype, None if fused_bias else bias)


class ChannelWiseScaledMMKernel(FP8ScaledMMLinearKernel):
    """Row-wise scales: ``scale_a`` [M, 1] per token and ``scale_b`` [1, N] per output channel.

    Per-tensor scales on either side are broadcast to rows, so this kernel takes every e4m3 combination.
    CUDA's row-wise path outputs bf16 only; other output dtypes are cast afterwards.
    """

    name = "scaled_mm_rowwise"

    @classmethod
    def can_implement(cls, config: FP8ScaledMMLinearLayerConfig, device: torch.device) -> tuple[bool, str | None]:
        reason = _common_checks(config, device)
        if reason:
            return False, reason
        if config.weight_quant_key.dtype != torch.float8_e4m3fn:
            return False, "row-wise _scaled_mm needs e4m3fn weights"
        if device.type == "cpu" and not cpu_rowwise_supported():
            return False, f"the CPU _scaled_mm of torch {torch.__version__} takes per-tensor scales only"
        return True, None

    def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out_dtype = self.output_dtype(x)
        x2d = _rows(x)
        rows = x2d.shape[0]
        weight, weight_scale, bias = layer_tensors(layer, x.device, bias)
        x_fp8, x_scale = self.quantize_input(layer, x2d)
        scale_a = x_scale if x_scale.dim() == 2 else x_scale.reshape(-1, 1)
        if scale_a.shape[0] != rows:
            scale_a = scale_a.expand(rows, 1).contiguous()
        if weight_scale.dim() == 1:
            scale_b = weight_scale.view(1, -1)
        else:
            scale_b = weight_scale.reshape(1, 1).expand(1, weight.shape[0]).contiguous()
        fused_bias = bias is not None and bias.dtype == torch.bfloat16
        out = torch._scaled_mm(
            x_fp8,
            weight.t(),
            scale_a=scale_a,
            scale_b=scale_b,
            bias=bias if fused_bias else None,
            out_dtype=torch.bfloat16,
        )
        return _finish(out, x, out_dtype, None if fused_bias else bias)
