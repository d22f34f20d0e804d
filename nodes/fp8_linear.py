"""The fp8 ``Linear`` protocol ComfyUI's model patcher speaks: LoRA patching and lowvram offload.

ComfyUI's ``ModelPatcher`` applies LoRA through a module's ``convert_weight`` (stored weight -> real values)
and ``set_weight`` (real values -> stored weight), or, in lowvram mode, through ``weight_function`` entries
run on the weight each forward; weights it did not load stay on the offload device. The mixin below does all
three for fp8 layers and leaves every other layer to the stock ComfyUI class it is mixed into.

This module does not import ``comfy``: the ComfyUI base classes are passed in, so the protocol logic is unit
tested without ComfyUI, against stand-ins with the same attributes.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fp8_quant import Fp8LinearParams
from fp8_quant.fp8_utils import (
    broadcast_weight_scale,
    cast_to_fp8,
    dequantize,
    quantize_weight,
    tensor_version,
    weight_row_amax,
)
from fp8_quant.layer_state import STATE_ATTRIBUTE, Fp8LayerState, is_fp8_layer, layer_state
from fp8_quant.methods_int8 import Int8LinearMethod
from fp8_quant.prepared import prepare_call, serve_prepared


@dataclass(frozen=True)
class WeightCaster:
    """How an offloaded layer's weight reaches the compute device: ComfyUI's own ``cast_bias_weight`` /
    ``uncast_bias_weight`` pair (offload streams, pinned buffers, transfers overlapped with compute), passed in by
    the node so that this module stays free of ``comfy`` imports. ``cast(layer, x)`` -> (weight, bias, handle)
    with the weight in its stored (fp8) dtype; ``uncast(layer, weight, bias, handle)`` after the product."""

    cast: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None, object]]
    uncast: Callable[[nn.Module, torch.Tensor, torch.Tensor | None, object], None]


class Fp8ComfyLinearMixin:
    """Put before a ComfyUI ``Linear`` class: fp8 forward plus the convert/set weight protocol."""

    fp8: Fp8LayerState | None = None  # the layer's 8-bit state (``fp8_quant.layer_state``), where it is quantized
    fp8_weight_caster: WeightCaster | None = None

    def is_fp8(self) -> bool:
        """Whether the layer is quantized (fp8, or int8: the same protocol, other arithmetic)."""
        return is_fp8_layer(self)

    def int8_method(self) -> Int8LinearMethod | None:
        """The layer's int8 method, where it is an int8 layer (its stored weight may be rotated: the method turns it
        into real values and back)."""
        state = layer_state(self)
        method = state.method if state is not None else None
        return method if isinstance(method, Int8LinearMethod) else None

    def current_weight_scale(self) -> torch.Tensor:
        """The scale of the weight the layer holds now (``Fp8LayerState.current_weight_scale``)."""
        return self.fp8.current_weight_scale(self)

    def fp8_params(self, weight: torch.Tensor | None = None, device: torch.device | None = None) -> Fp8LinearParams:
        """The tensors the kernel multiplies with: the current weight (or ``weight``, e.g. one ComfyUI streamed in)
        and its scale, and the layer's learning activation quantizer; scales are copied to ``device`` once and
        cached."""
        state = self.fp8
        group = state.layer_config.weight_quant_key.group_shape
        weight_scale, input_scale = self.current_weight_scale(), self.input_scale
        if device is not None:
            weight_scale = self._scale_on(weight_scale, device)
            input_scale = self._scale_on(input_scale, device) if input_scale is not None else None
        weight = self.weight if weight is None else weight
        return Fp8LinearParams(weight, weight_scale, input_scale, group, state.activation)

    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **kwargs) -> torch.Tensor:
        """Stored fp8 values (already upcast by ComfyUI) -> real weight values, for LoRA math."""
        if not self.is_fp8():
            return weight
        int8 = self.int8_method()
        if int8 is not None:
            real = int8.real_weight(self, weight, self.current_weight_scale().to(weight.device)).to(weight.dtype)
            return weight.copy_(real) if inplace else real
        scale = self._scale_like(weight)
        if inplace:
            weight *= scale
            return weight
        return weight * scale

    def set_weight(
        self,
        weight: torch.Tensor,
        inplace_update: bool = False,
        seed: int | None = None,
        return_weight: bool = False,
        **kwargs,
    ) -> torch.Tensor | None:
        """Real (LoRA-patched) values -> stored weight.

        The patched weight is re-quantized with scales of its own (a LoRA can push quiet channels far past the
        old range), remembered with a weak reference to the new weight, so that ComfyUI's unpatch, which puts the
        backed-up weight back, brings the old scale back with it. ``return_weight`` (lowvram, per forward)
        returns the real values, which the forward multiplies in high precision.
        """
        if not self.is_fp8():
            return self._set_high_precision_weight(weight, inplace_update, return_weight)
        self._refuse_non_finite_patch(weight)
        if return_weight:
            return weight
        int8 = self.int8_method()
        if int8 is not None:
            return self._set_int8_weight(int8, weight, inplace_update)
        if inplace_update:  # the weight object stays, so its scale must too: out-of-range values saturate
            scale = self._scale_like(weight).float()
            self.weight.data.copy_(cast_to_fp8(weight.float() / scale, self.weight.dtype))
            return None
        group = self.fp8.layer_config.weight_quant_key.group_shape
        stored, scale = quantize_weight(weight.float(), self.weight.dtype, group)
        self.weight = nn.Parameter(stored, requires_grad=False)
        self.fp8.patched = (weakref.ref(self.weight), scale.to(self.weight_scale.device))
        return None

    def _set_int8_weight(self, int8: Int8LinearMethod, weight: torch.Tensor, inplace_update: bool) -> None:
        """Real (patched) values -> the int8 weight, rotated as the layer's is; a new scale unless in place (as for
        fp8 above: the scale is remembered with the new weight)."""
        if inplace_update:
            scale = self.current_weight_scale().to(weight.device)
            self.weight.data.copy_(int8.stored_with_scale(self, weight, scale))
            return None
        stored, scale = int8.stored_weight(self, weight.float())
        self.weight = nn.Parameter(stored, requires_grad=False)
        self.fp8.patched = (weakref.ref(self.weight), scale.to(self.weight_scale.device))
        return None

    def _refuse_non_finite_patch(self, weight: torch.Tensor) -> None:
        """A patch (LoRA) whose values are NaN or inf would be rounded into the fp8 weight and sample a NaN image;
        stock ComfyUI does the same without a word. Refused here, naming the layer, before anything is stored: the
        layer keeps its unpatched weight (ComfyUI's backup of it is the same tensor). One reduction per row."""
        row_amax = weight_row_amax(weight) if weight.dim() == 2 else weight.abs().amax().reshape(1)
        if bool(torch.isfinite(row_amax).all()):
            return
        bad = int((~torch.isfinite(weight)).sum())
        name = self.fp8.name
        raise ValueError(
            f"{name}: the LoRA/patch applied to this layer gives {bad} NaN/inf weight value(s); the patch is refused "
            "(check the LoRA file and its strength)"
        )

    def _scale_like(self, weight: torch.Tensor) -> torch.Tensor:
        """The current weight scale on ``weight``'s device and dtype, broadcastable against it (blocks repeated)."""
        group = self.fp8.layer_config.weight_quant_key.group_shape
        scale = self.current_weight_scale().to(device=weight.device, dtype=weight.dtype)
        return broadcast_weight_scale(scale, weight.shape, group)

    def _set_high_precision_weight(
        self, weight: torch.Tensor, inplace_update: bool, return_weight: bool
    ) -> torch.Tensor | None:
        stored = weight.to(self.weight.dtype)
        if return_weight:
            return stored
        if inplace_update:
            self.weight.data.copy_(stored)
        else:
            self.weight = nn.Parameter(stored, requires_grad=False)
        return None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        state = self.__dict__.get(STATE_ATTRIBUTE)  # layer_state(self), inlined: once per forward
        if state is None:
            return super().forward(x, *args, **kwargs)
        if getattr(self, "weight_function", None) or getattr(self, "bias_function", None):
            return self._forward_lowvram_patched(x)
        bias = self.bias
        out = serve_prepared(self, state, x, bias)  # the usual call: nothing changed since the last one
        if out is not None:
            return out
        caster = self.fp8_weight_caster
        if caster is not None and self.weight.device != x.device:
            return self._forward_offloaded(caster, x)
        out = state.method.apply_params(self, self.fp8_params(), x, bias)
        prepare_call(self, state, x, bias)
        return out

    def _forward_offloaded(self, caster: WeightCaster, x: torch.Tensor) -> torch.Tensor:
        """A layer ComfyUI left on the offload device (lowvram): its weight comes over through ComfyUI's caster,
        the fp8 kernel runs on it, and ComfyUI's offload stream is released after."""
        weight, bias, handle = caster.cast(self, x)
        output = self.fp8.method.apply_params(self, self.fp8_params(weight, x.device), x, bias)
        caster.uncast(self, weight, bias, handle)
        return output

    def _forward_lowvram_patched(self, x: torch.Tensor) -> torch.Tensor:
        """lowvram LoRA: ComfyUI's patches run for this call only, on the real weight values in the compute dtype
        (what its own layers hand them), and the product runs in high precision."""
        weight = self.weight.to(x.device, non_blocking=True)
        bias = self.bias.to(x.device, x.dtype) if self.bias is not None else None
        for function in getattr(self, "bias_function", None) or []:
            bias = function(bias)
        weight_functions = getattr(self, "weight_function", None) or []
        params = self.fp8_params(weight, x.device)
        if not weight_functions:
            return self.fp8.method.apply_params(self, params, x, bias)
        int8 = self.int8_method()
        if int8 is not None:
            weight = int8.real_weight(self, weight, params.weight_scale).to(x.dtype)
        else:
            weight = dequantize(weight, params.weight_scale, x.dtype, params.weight_group)
        for function in weight_functions:
            _take_real_values(function)
            weight = function(weight)
        return F.linear(x, weight.to(x.dtype), bias)

    def _scale_on(self, scale: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The scale's copy on ``device``, made once: a copy from pageable host memory per call would make the
        host wait for the GPU at every offloaded layer, and the scales are a few KB."""
        if scale.device == device:
            return scale
        cache = self.fp8.scales_on_device
        key = (id(scale), tensor_version(scale), device)
        cached = cache.get(key)
        if cached is None or cached[0] is not scale:
            if len(cache) > 8:  # old scales of LoRA-patched weights
                cache.clear()
            cached = (scale, scale.detach().to(device))
            cache[key] = cached
        return cached[1]


def _take_real_values(function) -> None:
    """Older ComfyUI's ``LowVramPatch`` converts the stored weight to real values itself through the layer's
    ``convert_weight``/``set_weight``; the forward above already hands it real values, so it must not convert
    again. Newer ComfyUI ignores these two attributes. They belong to this layer's own patch objects."""
    if getattr(function, "is_lowvram_patch", False):
        if getattr(function, "convert_func", None) is not None:
            function.convert_func = None
        if getattr(function, "set_func", None) is not None:
            function.set_func = None


_mixed_classes: dict[type, type] = {}


def fp8_class_for(linear_class: type) -> type:
    """The fp8 subclass of a ComfyUI (or any) ``Linear`` class, made once per class."""
    mixed = _mixed_classes.get(linear_class)
    if mixed is None:
        mixed = type(f"Fp8{linear_class.__name__}", (Fp8ComfyLinearMixin, linear_class), {})
        _mixed_classes[linear_class] = mixed
    return mixed


def install_comfy_forward(module: nn.Linear, caster: WeightCaster | None = None) -> None:
    """``prepare_model_for_fp8`` installer for built ComfyUI models (text encoders): swap in the fp8 class."""
    module.__class__ = fp8_class_for(type(module))
    if caster is not None:
        module.fp8_weight_caster = caster
