"""A ComfyUI operations class whose ``Linear`` loads each layer of a state dict as ``Fp8Recipe`` decides
(``fp8_quant.layer_loader.load_layer``: the same loader as the bridge's).

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

from fp8_quant import Fp8Recipe
from fp8_quant.bridge import prepare_kernels
from fp8_quant.formats.comfy_formats import crop_mx_padding
from fp8_quant.fp8_utils import is_fp8_dtype
from fp8_quant.layer_loader import load_layer
from fp8_quant.layer_state import fp8_layers
from fp8_quant.report import Fp8Report

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

    def prepare_kernels(self, model: nn.Module, device: torch.device) -> str:
        """Every fp8 layer's kernels chosen now, for the compute device; the report's line with the kernel choice."""
        quantized = [layer for _, layer in fp8_layers(model)]
        if quantized:
            prepare_kernels(self.report, quantized, device, self.recipe.kernel)
        return self.report.summary()


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
    compute_dtype = _model_dtype(layer)
    if bias is not None and compute_dtype is not None:
        bias = bias.to(compute_dtype)  # the compute dtype: the fp8 GEMM fuses a bias of its output dtype
    layer.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
    report = load_layer(
        layer, name, plan.recipe, weight, scale, state_dict.get(prefix + "input_scale"),
        quantize_device=plan.quantize_device, result_device=plan.result_device, compute_dtype=compute_dtype,
        casts_per_call=bool(getattr(type(layer), "comfy_cast_weights", False)), dequantize_kept=True,
    )  # fmt: skip
    plan.report.layers.append(report)
    if plan.progress is not None:
        plan.progress(name)


def _model_dtype(layer: nn.Module) -> torch.dtype | None:
    """The float dtype ComfyUI built ``layer`` for (its compute dtype), where it gave one."""
    dtype = layer.fp8_model_dtype
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else None
