"""A ComfyUI operations class whose ``Linear`` loads each layer of a state dict as ``Fp8Recipe`` decides.

ComfyUI builds a diffusion model with an ``operations`` class (``custom_operations`` in its model options, as
ComfyUI-GGUF does) and then loads the state dict into it; the ``Linear`` here takes its tensors in
``_load_from_state_dict``, one layer at a time, so a bf16 file is quantized layer by layer and never exists
in full precision and fp8 at once. No ``comfy`` import: the base operations class is passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from fp8_quant import Fp8Recipe, LayerDecision
from fp8_quant.formats.comfy_formats import crop_mx_padding
from fp8_quant.fp8_utils import dequantize, is_fp8_dtype
from fp8_quant.methods import normalize_weight_scale
from fp8_quant.methods_int8 import normalize_int8_scale
from fp8_quant.quant_int8 import dequantize_int8_weight
from fp8_quant.report import Fp8Report, LayerReport, bf16_bytes, fp8_layer_bytes, layer_format, tensor_bytes
from fp8_quant.scheme import weight_group_of_scale

from .fp8_linear import Fp8ComfyLinearMixin, WeightCaster


@dataclass
class LoadPlan:
    """One model load: the recipe, where to quantize and where the fp8 layers stay, how offloaded weights travel,
    and the report being filled."""

    recipe: Fp8Recipe
    quantize_device: torch.device | str | None = None
    result_device: torch.device | str | None = None
    progress: Callable[[str], None] | None = None
    weight_caster: WeightCaster | None = None
    report: Fp8Report = field(init=False)

    def __post_init__(self) -> None:
        self.report = Fp8Report(self.recipe.config)


def make_fp8_operations(base_operations: type, plan: LoadPlan) -> type:
    """A ComfyUI operations class (pass as ``custom_operations``) whose ``Linear`` loads by ``plan``."""

    class Linear(Fp8ComfyLinearMixin, base_operations.Linear):
        fp8_weight_caster = plan.weight_caster

        def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
            # The base class sets up whatever attributes ComfyUI's ops expect, on the meta device: no memory is
            # allocated, the state dict brings the tensors (fp8, or high precision to quantize one by one).
            super().__init__(in_features, out_features, bias=bias, device="meta", dtype=dtype)
            self.weight = None
            self.bias = None
            self.weight_scale = None
            self.input_scale = None
            self.fp8_model_dtype = dtype

        def reset_parameters(self) -> None:
            return None

        def _load_from_state_dict(
            self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        ) -> None:
            _load_from_state_dict(self, plan, state_dict, prefix, missing_keys, error_msgs)

    class Fp8Operations(base_operations):
        pass

    Fp8Operations.Linear = Linear
    return Fp8Operations


def _load_from_state_dict(
    layer: nn.Module, plan: LoadPlan, state_dict: dict, prefix: str, missing_keys: list, error_msgs: list
) -> None:
    """torch's per-module state-dict hook for the fp8 ``Linear``: check the weight fits, ask the recipe, load."""
    name = prefix[:-1]
    weight = state_dict.get(prefix + "weight")
    if weight is None:
        missing_keys.append(prefix + "weight")
        return
    expected = [layer.out_features, layer.in_features]
    scale = state_dict.get(prefix + "weight_scale")
    cropped = crop_mx_padding(weight, scale, *expected) if is_fp8_dtype(weight.dtype) and scale is not None else None
    if cropped is not None:  # an mxfp8 weight stored padded to 32
        weight, scale = cropped
    if list(weight.shape) != expected:
        error_msgs.append(f"{name}: weight has shape {list(weight.shape)}, the model expects {expected}")
        return
    bias = state_dict.get(prefix + "bias")
    if bias is not None and _model_dtype(layer) is not None:
        bias = bias.to(_model_dtype(layer))  # the compute dtype: the fp8 GEMM fuses a bias of its output dtype
    layer.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
    decision = plan.recipe.decide(name, weight, has_input_scale=prefix + "input_scale" in state_dict)
    scales = (scale, state_dict.get(prefix + "input_scale"))
    plan.report.layers.append(_load_layer(layer, decision, weight, scales, plan))
    if plan.progress is not None:
        plan.progress(name)


def _load_layer(
    layer: nn.Module,
    decision: LayerDecision,
    weight: torch.Tensor,
    scales: tuple[torch.Tensor | None, torch.Tensor | None],
    plan: LoadPlan,
) -> LayerReport:
    """Give ``layer`` its weight as ``decision`` says: fp8 through the method, or high precision. ``scales``: the
    file's weight and input scales for an fp8 weight."""
    size = tensor_bytes(weight)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if decision.method is not None:
        if is_fp8_dtype(weight.dtype):
            layer.weight_scale, layer.input_scale = scales
        elif weight.dtype == torch.int8:
            layer.weight_scale, layer.input_scale = scales[0], None
        decision.method.process_weights_after_loading(
            layer, decision.name, plan.quantize_device, plan.result_device
        )
        layer.fp8_method = decision.method
        held = fp8_layer_bytes(layer)
        return LayerReport(
            decision.name, True, decision.reason, size, held, bf16_bytes(weight), number_format=layer_format(layer)
        )
    if is_fp8_dtype(weight.dtype):  # the user keeps this fp8 layer in high precision: its real values
        layer.weight = nn.Parameter(_dequantized(layer, weight, scales[0], decision.name), requires_grad=False)
    elif weight.dtype == torch.int8:  # a kept int8 layer: its real values, turned back from the file's rotation
        scale = normalize_int8_scale(scales[0], tuple(weight.shape), decision.name)
        values = dequantize_int8_weight(weight, scale, decision.stored_rotation, _model_dtype(layer) or torch.bfloat16)
        layer.weight = nn.Parameter(values, requires_grad=False)
    elif _model_dtype(layer) not in (None, weight.dtype) and weight.dtype.is_floating_point:
        if not getattr(type(layer), "comfy_cast_weights", False):
            # Plain operations do not cast per call: the weight goes in the dtype ComfyUI built the layer for, as its
            # own loader stores it (weight-casting operations cast it from the file's dtype at every call instead).
            layer.weight = nn.Parameter(weight.to(_model_dtype(layer)), requires_grad=False)
    held_bytes = tensor_bytes(layer.weight)
    return LayerReport(decision.name, False, decision.reason, size, held_bytes, bf16_bytes(weight), layer.weight.dtype)


def _model_dtype(layer: nn.Module) -> torch.dtype | None:
    """The float dtype ComfyUI built ``layer`` for (its compute dtype), where it gave one."""
    dtype = layer.fp8_model_dtype
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else None


def _dequantized(layer: nn.Module, weight: torch.Tensor, scale: torch.Tensor | None, name: str) -> torch.Tensor:
    scale = normalize_weight_scale(scale if scale is not None else torch.ones(()), tuple(weight.shape), name)
    group = weight_group_of_scale(tuple(scale.shape), *weight.shape)
    dtype = _model_dtype(layer) or torch.bfloat16
    return dequantize(weight, scale, dtype, group)
