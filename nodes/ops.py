"""FP8 linears that take part in ComfyUI's model protocols (LoRA patching and lowvram offload).

ComfyUI's ``ModelPatcher`` applies LoRA through a module's ``convert_weight`` (stored weight -> real values)
and ``set_weight`` (real values -> stored weight), or, in lowvram mode, through ``weight_function`` entries
run on the weight each forward; weights it did not load stay on the offload device. The mixin below does all
three for fp8 layers and leaves every other layer to the stock ComfyUI class it is mixed into.

This module does not import ``comfy``: the ComfyUI base classes are passed in, so the protocol logic is unit
tested without ComfyUI, against stand-ins with the same attributes.
"""

from __future__ import annotations

import logging
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fp8_quant import Fp8Config, Fp8LinearMethod, Fp8OnlineLinearMethod
from fp8_quant.bridge import Fp8Report, LayerReport, fp8_layer_bytes
from fp8_quant.config import matching_pattern
from fp8_quant.fp8_utils import cast_to_fp8, dequantize, is_fp8_dtype, quantize_weight

logger = logging.getLogger(__name__)


def _scale_for(weight_scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    scale = weight_scale.to(device=like.device, dtype=like.dtype)
    return scale.reshape(-1, 1) if scale.dim() else scale


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

    fp8_method: Fp8LinearMethod | None = None
    fp8_weight_caster: WeightCaster | None = None

    def is_fp8(self) -> bool:
        return self.__dict__.get("fp8_method") is not None

    def current_weight_scale(self) -> torch.Tensor:
        """The scale of the weight the layer holds now: a LoRA-patched weight brings its own scale, and when
        ComfyUI's unpatch puts the backed-up weight back, the layer's own scale applies again."""
        patched = self.__dict__.get("patched_weight")
        if patched is not None and patched[0]() is self.weight:
            return patched[1]
        return self.weight_scale

    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **kwargs) -> torch.Tensor:
        """Stored fp8 values (already upcast by ComfyUI) -> real weight values, for LoRA math."""
        if not self.is_fp8():
            return weight
        scale = _scale_for(self.current_weight_scale(), weight)
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
            stored = weight.to(self.weight.dtype)
            if return_weight:
                return stored
            if inplace_update:
                self.weight.data.copy_(stored)
            else:
                self.weight = nn.Parameter(stored, requires_grad=False)
            return None
        if return_weight:
            return weight
        if inplace_update:  # the weight object stays, so its scale must too: out-of-range values saturate
            scale = _scale_for(self.current_weight_scale(), weight).float()
            self.weight.data.copy_(cast_to_fp8(weight.float() / scale, self.weight.dtype))
            return None
        per_channel = self.weight_scale.dim() == 1
        stored, scale = quantize_weight(weight.float(), self.weight.dtype, per_channel=per_channel)
        self.weight = nn.Parameter(stored, requires_grad=False)
        self.patched_weight = (weakref.ref(self.weight), scale.to(self.weight_scale.device))
        return None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.is_fp8():
            return super().forward(x, *args, **kwargs)
        method: Fp8LinearMethod = self.fp8_method
        weight_functions = getattr(self, "weight_function", None) or []
        bias_functions = getattr(self, "bias_function", None) or []
        weight_scale = self.current_weight_scale()
        if not weight_functions and not bias_functions:
            caster = self.fp8_weight_caster
            if caster is not None and self.weight.device != x.device:
                return self._forward_offloaded(caster, x, weight_scale)
            if weight_scale is self.weight_scale:
                return method.apply(self, x, self.bias)
            tensors = types.SimpleNamespace(weight=self.weight, weight_scale=weight_scale, input_scale=self.input_scale)
            return method.kernel_for(self, x.device).apply_weights(tensors, x, self.bias)
        # lowvram LoRA: ComfyUI's patches run for this call only, on the real weight values in the compute dtype
        # (what its own layers hand them), and the product runs in high precision.
        weight = self.weight.to(x.device, non_blocking=True)
        bias = self.bias.to(x.device, x.dtype) if self.bias is not None else None
        for function in bias_functions:
            bias = function(bias)
        if not weight_functions:
            tensors = types.SimpleNamespace(weight=weight, weight_scale=weight_scale, input_scale=self.input_scale)
            return method.kernel_for(self, x.device).apply_weights(tensors, x, bias)
        weight = dequantize(weight, self._scale_on(weight_scale, x.device), x.dtype)
        for function in weight_functions:
            _take_real_values(function)
            weight = function(weight)
        return F.linear(x, weight.to(x.dtype), bias)

    def _forward_offloaded(self, caster: WeightCaster, x: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
        """A layer ComfyUI left on the offload device (lowvram): its weight comes over through ComfyUI's caster,
        the fp8 kernel runs on it, and ComfyUI's offload stream is released after."""
        weight, bias, handle = caster.cast(self, x)
        input_scale = self._scale_on(self.input_scale, x.device) if self.input_scale is not None else None
        tensors = types.SimpleNamespace(
            weight=weight, weight_scale=self._scale_on(weight_scale, x.device), input_scale=input_scale
        )
        output = self.fp8_method.kernel_for(self, x.device).apply_weights(tensors, x, bias)
        caster.uncast(self, weight, bias, handle)
        return output

    def _scale_on(self, scale: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The scale's copy on ``device``, made once: a copy from pageable host memory per call would make the
        host wait for the GPU at every offloaded layer, and the scales are a few KB."""
        if scale.device == device:
            return scale
        cache: dict = self.__dict__.setdefault("fp8_scales_on_device", {})
        key = (id(scale), scale._version, device)
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


@dataclass
class LoadPlan:
    """How ``LoadFP8DiT`` turns each linear of a state dict into a layer.

    ``fp8_config`` applies to layers stored in fp8 (from the file, with the user's overrides); ``online_config``
    quantizes high-precision layers on the fly (``None`` keeps them as they are); ``skip_patterns`` keep
    layers in high precision either way.
    """

    fp8_config: Fp8Config | None
    online_config: Fp8Config | None
    kernel: str | None = None
    skip_patterns: tuple[str, ...] = ()
    quantize_device: torch.device | str | None = None
    progress: Callable[[str], None] | None = None
    weight_caster: WeightCaster | None = None
    report: Fp8Report = field(default_factory=lambda: Fp8Report(Fp8Config()))

    def fp8_method(self, has_input_scale: bool) -> Fp8LinearMethod:
        config = self.fp8_config or Fp8Config(weight_granularity="tensor")
        if config.activation_scheme == "static" and not has_input_scale:
            config = Fp8Config.from_dict(
                {**config.to_dict(), "activation_scheme": "dynamic", "activation_granularity": "token"}
            )
        return Fp8LinearMethod(config, self.kernel)


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

        def reset_parameters(self) -> None:
            return None

        def _load_from_state_dict(
            self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        ) -> None:
            name = prefix[:-1]
            weight = state_dict.get(prefix + "weight")
            if weight is None:
                missing_keys.append(prefix + "weight")
                return
            if tuple(weight.shape) != (self.out_features, self.in_features):
                error_msgs.append(
                    f"{name}: weight has shape {list(weight.shape)}, the model expects "
                    f"[{self.out_features}, {self.in_features}]"
                )
                return
            bias = state_dict.get(prefix + "bias")
            self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
            self.weight = nn.Parameter(weight, requires_grad=False)
            size = weight.numel() * weight.element_size()
            skip = matching_pattern(name, plan.skip_patterns)
            if is_fp8_dtype(weight.dtype):
                self.weight_scale = state_dict.get(prefix + "weight_scale")
                self.input_scale = state_dict.get(prefix + "input_scale")
                method = plan.fp8_method(self.input_scale is not None)
                method.process_weights_after_loading(self, name)
                self.fp8_method = method
                plan.report.layers.append(LayerReport(name, True, "fp8 in file", size, size))
            elif plan.online_config is not None and skip is None and weight.dim() == 2:
                method = Fp8OnlineLinearMethod(plan.online_config, plan.kernel)
                method.process_weights_after_loading(self, name, plan.quantize_device)
                self.fp8_method = method
                plan.report.layers.append(LayerReport(name, True, "quantized", size, fp8_layer_bytes(self)))
            else:
                reason = f"matched {skip!r}" if skip else f"{weight.dtype} in file"
                plan.report.layers.append(LayerReport(name, False, reason, size, size))
            if plan.progress is not None:
                plan.progress(name)

    class Fp8Operations(base_operations):
        pass

    Fp8Operations.Linear = Linear
    return Fp8Operations
