"""Load one linear as its recipe decides: the one place a layer becomes 8-bit or is kept, for every caller.

The bridge (a built model's ``nn.Linear``) and ComfyUI's ``Linear`` (``nodes/comfy_ops``, a state dict loaded layer
by layer) both call ``load_layer`` with the weight as it arrives and its file's scales. Rules that live here:

- the recipe decides (``Fp8Recipe.decide``); an fp8 weight with no scale at all (a plain cast a built model holds)
  is used at unit scale, after its bytes are checked for NaN/inf;
- a quantized layer gets its scales and goes through its method, which installs ``layer.fp8`` (``layer_state``);
- a kept layer (``kept_weight``): where the caller wants real values (``dequantize_kept``: a fresh layer that
  multiplies high-precision weights), an fp8 or int8 weight is dequantized (int8 turned back from its file's
  rotation) into the compute dtype (bf16 where none is known); a high-precision weight goes into the compute
  dtype where the layer does not cast per call; a weight wider than the recipe's ``keep_dtype`` is stored in it and
  upcast per call.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import Fp8Recipe, LayerDecision
from .fp8_utils import count_fp8_non_finite, dequantize, is_fp8_dtype, unit_weight_scale
from .layer_state import STATE_ATTRIBUTE, is_fp8_layer
from .methods import normalize_weight_scale
from .methods_int8 import normalize_int8_scale
from .quant_int8 import dequantize_int8_weight
from .report import LayerReport, bf16_bytes, fp8_layer_bytes, layer_format, tensor_bytes
from .scheme import weight_group_of_scale

Device = torch.device | str | None
ALREADY_8BIT = "already fp8"


def load_layer(
    layer: nn.Module,
    name: str,
    recipe: Fp8Recipe,
    weight: torch.Tensor | None,
    weight_scale: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
    *,
    quantize_device: Device = None,
    result_device: Device = None,
    compute_dtype: torch.dtype | None = None,
    casts_per_call: bool = False,
    dequantize_kept: bool = False,
    install: Callable[[nn.Module], None] | None = None,
) -> LayerReport:
    """Give ``layer`` the weight ``weight`` (and its file's scales) as ``recipe`` decides for ``name``; the report.

    ``quantize_device``: where a high-precision weight is quantized; ``result_device``: where the layer's tensors
    end up (default: the weight's device). ``compute_dtype``: the dtype the model computes in, where known;
    ``casts_per_call``: the layer casts its weight to the input's dtype at every call (ComfyUI's manual-cast
    operations); ``dequantize_kept``: a kept 8-bit weight is turned into real values (else it stays as it is, for a
    layer whose own forward handles it). ``install``: called on a quantized layer (its fp8 forward)."""
    size, bf16_size = tensor_bytes(weight), bf16_bytes(weight)
    if is_fp8_layer(layer) and weight is layer.weight:  # a built model's layer quantized before
        return LayerReport(name, False, ALREADY_8BIT, size, size, bf16_size)
    layer.__dict__.pop(STATE_ATTRIBUTE, None)  # a layer loaded again starts with no 8-bit state
    unit_scale = weight is not None and is_fp8_dtype(weight.dtype) and weight_scale is None
    if unit_scale:  # a model built from a file this pack never read: its fp8 bytes are checked here
        bad = count_fp8_non_finite(weight)
        if bad:
            raise ValueError(f"{name}: fp8 weight holds {bad} NaN/inf value(s); the model's file is corrupt")
    decision = recipe.decide(name, weight, has_input_scale=input_scale is not None, unit_scale=unit_scale)
    if weight is not None and layer.weight is not weight:
        layer.weight = nn.Parameter(weight, requires_grad=False)
    if decision.method is None:
        if weight is not None:
            _keep(layer, decision, weight, weight_scale, compute_dtype, casts_per_call, dequantize_kept)
        held = layer.weight.dtype if layer.weight is not None else None
        return LayerReport(name, False, decision.reason, size, tensor_bytes(layer.weight), bf16_size, held)
    if unit_scale:
        # A plain fp8 cast (how ComfyUI holds an fp8 text-encoder file on a GPU): the stored values are the
        # weights, at unit scale. Re-quantizing cannot win back precision, so they are used as they are.
        weight_scale = unit_weight_scale(weight)
    if is_fp8_dtype(weight.dtype):
        layer.weight_scale, layer.input_scale = weight_scale, input_scale
    elif weight.dtype == torch.int8:
        layer.weight_scale, layer.input_scale = weight_scale, None
    decision.method.process_weights_after_loading(layer, decision.name, quantize_device, result_device)
    if install is not None:
        install(layer)
    scheme = str(layer.fp8.layer_config.weight_quant_key)
    return LayerReport(name, True, decision.reason, size, fp8_layer_bytes(layer), bf16_size,
                       number_format=layer_format(layer), weight_scheme=scheme)  # fmt: skip


def kept_weight(
    decision: LayerDecision,
    weight: torch.Tensor,
    weight_scale: torch.Tensor | None,
    compute_dtype: torch.dtype | None,
    casts_per_call: bool,
) -> torch.Tensor:
    """The tensor a kept layer holds (see the module docstring): real values of an 8-bit weight, a high-precision
    weight in the compute dtype unless the layer casts per call, or the weight as it is."""
    if is_fp8_dtype(weight.dtype):  # the user keeps this fp8 layer in high precision: its real values
        scale = normalize_weight_scale(weight_scale if weight_scale is not None else torch.ones(()),
                                       tuple(weight.shape), decision.name)  # fmt: skip
        group = weight_group_of_scale(tuple(scale.shape), *weight.shape)
        return dequantize(weight, scale, compute_dtype or torch.bfloat16, group)
    if weight.dtype == torch.int8:  # a kept int8 layer: its real values, turned back from the file's rotation
        scale = normalize_int8_scale(weight_scale, tuple(weight.shape), decision.name)
        return dequantize_int8_weight(weight, scale, decision.stored_rotation, compute_dtype or torch.bfloat16)
    if compute_dtype not in (None, weight.dtype) and weight.dtype.is_floating_point and not casts_per_call:
        # Plain operations do not cast per call: the weight goes in the dtype the model computes in, as ComfyUI's own
        # loader stores it (weight-casting operations cast it from the file's dtype at every call instead).
        return weight.to(compute_dtype)
    return weight


def _keep(
    layer: nn.Module,
    decision: LayerDecision,
    weight: torch.Tensor,
    weight_scale: torch.Tensor | None,
    compute_dtype: torch.dtype | None,
    casts_per_call: bool,
    dequantize_kept: bool,
) -> None:
    if dequantize_kept:
        kept = kept_weight(decision, weight, weight_scale, compute_dtype, casts_per_call)
        if kept is not weight:
            layer.weight = nn.Parameter(kept, requires_grad=False)
    if _narrower(decision.keep_dtype, layer.weight):
        _store_in(layer, decision.keep_dtype)


def _narrower(dtype: torch.dtype | None, weight: torch.Tensor | None) -> bool:
    if dtype is None or weight is None or not weight.dtype.is_floating_point or is_fp8_dtype(weight.dtype):
        return False
    return torch.finfo(dtype).bits < torch.finfo(weight.dtype).bits


def _store_in(module: nn.Module, dtype: torch.dtype) -> None:
    """A layer kept in high precision stored in ``dtype`` (an fp32 model's kept layers in bf16), computed in the
    input's dtype. A new parameter: the old one may be shared with another model."""
    module.weight = nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)
    module.forward = types.MethodType(_upcast_linear_forward, module)


def _upcast_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = self.bias.to(x.dtype) if self.bias is not None else None
    return F.linear(x, self.weight.to(x.dtype), bias)


__all__ = ["ALREADY_8BIT", "kept_weight", "load_layer"]
