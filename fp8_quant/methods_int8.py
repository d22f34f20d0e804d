"""int8 linear methods: they own an int8 layer's parameters and route its product to an int8 kernel.

``Int8LinearMethod`` takes weights that are already int8 (ComfyUI 0.30's ``int8_tensorwise`` files, rotated by
ConvRot or not); ``Int8OnlineLinearMethod`` rounds a bf16/fp16/fp32 weight to int8 when it is loaded, rotated in
groups (``rotation``), one layer at a time. Both end with the layout every kernel reads (``Fp8LinearParams``):
``weight`` int8 ``[N, K]`` contiguous (rotated where the layer's ``rotation_group`` says), ``weight_scale`` float32
``[N]`` or ``[]``, no input scale (activations are scaled per row at every call). The layer's own scheme, its
rotation group included, is its ``layer.fp8.layer_config`` (an ``Int8LinearLayerConfig``, see ``layer_state``): the
LoRA protocol reads it to turn a stored weight into real values and back.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .auto_scales import CalibrationTally
from .config import Int8Config
from .fp8_utils import check_scale, weight_row_amax
from .kernels.int8_mm import INT8_KERNELS, Int8LinearKernel, Int8LinearLayerConfig
from .kernels.selection import explain_choice, select_kernel
from .layer_state import Fp8LayerState
from .methods import _checked_weight, _parameter, apply_prepared, compute_device
from .params import Fp8LinearParams
from .quant_int8 import dequantize_int8_weight, quantize_int8_weight, quantize_int8_with_scale
from .rotation import group_size_problem, largest_group
from .scheme import PER_CHANNEL, PER_TENSOR, GroupShape, weight_group_of_scale, weight_key

logger = logging.getLogger(__name__)
Device = torch.device | str | None


class Int8LinearMethod:
    """For layers whose checkpoint already holds an int8 weight and its scale (rotated by ``config.rotation_group``
    where the file says so)."""

    def __init__(self, config: Int8Config, kernel: str | None = None) -> None:
        self.config = config
        self.kernel = kernel
        self.calibration = CalibrationTally()  # nothing is learnt: activations are scaled per row at every call

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, params_dtype=None, device=None
    ) -> None:
        """Register empty parameters of the checkpoint's shapes, to be filled by a state dict load."""
        layer.weight = _parameter(torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        shape = (out_features,) if self.config.per_channel else ()
        layer.weight_scale = _parameter(torch.ones(shape, dtype=torch.float32, device=device))
        layer.input_scale = None

    def process_weights_after_loading(
        self, layer: nn.Module, name: str = "", quantize_device: Device = None, result_device: Device = None
    ) -> None:
        """Validate what was loaded and normalise it: contiguous int8 ``[N, K]``, a float32 scale ``[N]`` or ``[]``."""
        what = name or type(layer).__name__
        weight = _checked_weight(layer, what)
        if weight.dtype != torch.int8:
            raise ValueError(f"{what}: Int8LinearMethod expects an int8 weight, got {weight.dtype}")
        group = self.config.rotation_group
        problem = group_size_problem(group, weight.shape[1]) if group is not None else None
        if problem is not None:
            raise ValueError(f"{what}: {problem}")
        scale = normalize_int8_scale(getattr(layer, "weight_scale", None), tuple(weight.shape), what)
        home = torch.device(result_device) if result_device is not None else weight.device
        self._install(layer, weight.detach().to(home).contiguous(), scale.to(home), group, what)

    def _install(
        self, layer: nn.Module, weight: torch.Tensor, scale: torch.Tensor, group: int | None, name: str
    ) -> None:
        # New Parameter objects, never in-place writes: a module shared with another model keeps its tensors.
        layer.weight = _parameter(weight)
        layer.weight_scale = _parameter(scale)
        layer.input_scale = None
        scale_group = weight.shape[1] // scale.shape[1] if scale.dim() == 2 else None
        if scale_group is not None:
            weight_group = GroupShape(scale_group, 1)
        else:
            weight_group = PER_CHANNEL if scale.dim() == 1 else PER_TENSOR
        layer_config = Int8LinearLayerConfig(
            weight_quant_key=weight_key(torch.int8, weight_group),
            in_features=weight.shape[1],
            out_features=weight.shape[0],
            rotation_group=group,
            quantizes_activations=self.config.quantizes_activations,
            out_dtype=self.config.output_dtype,
            scale_group=scale_group,
        )
        layer.fp8 = Fp8LayerState(self, layer_config, name)

    def kernel_for(self, layer: nn.Module, device: torch.device) -> Int8LinearKernel:
        """The kernel for this layer on ``device`` (int8 layers have one scheme)."""
        kernels = layer.fp8.kernels
        kernel = kernels.get(device)
        if kernel is None:
            kernel = select_kernel(layer.fp8.layer_config, device, self.kernel, INT8_KERNELS)
            kernels[device] = kernel
        return kernel

    def explain_kernel(self, layer: nn.Module, device: torch.device, forced: str | None = None) -> str:
        """The sentence saying which kernel runs this layer on ``device`` and why (for reports)."""
        return explain_choice(layer.fp8.layer_config, device, forced, INT8_KERNELS)[1]

    def prepare_kernels(self, layer: nn.Module, device: torch.device | str) -> None:
        """Choose the layer's kernel for ``device`` now, outside any ``torch.compile`` trace."""
        self.kernel_for(layer, compute_device(device))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return apply_prepared(self, layer, x, bias)

    def apply_params(
        self, layer: nn.Module, params: Fp8LinearParams, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The product with tensors other than the layer's own (a LoRA-patched weight, an offloaded one)."""
        kernel = layer.fp8.kernels.get(x.device) or self.kernel_for(layer, x.device)
        return kernel.apply(params, x, bias)

    # The weight protocol of ComfyUI's patcher (LoRA): stored values <-> real values, through the rotation.

    def real_weight(self, layer: nn.Module, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """A stored weight (int8 values, possibly upcast to float by ComfyUI) -> its real values, un-rotated, in
        ``weight``'s float dtype (float32 for int8)."""
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        return dequantize_int8_weight(weight, scale, layer.fp8.layer_config.rotation_group, dtype)

    def stored_weight(self, layer: nn.Module, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Real values -> (int8 weight, new scale) of the layer's granularity and rotation."""
        config: Int8LinearLayerConfig = layer.fp8.layer_config
        per_channel = config.weight_quant_key.group_shape.is_per_channel()
        return quantize_int8_weight(real, per_channel, config.rotation_group, config.scale_group)

    def stored_with_scale(self, layer: nn.Module, real: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Real values -> int8 values at a given scale (an in-place update keeps the weight's scale)."""
        return quantize_int8_with_scale(real, scale, layer.fp8.layer_config.rotation_group)


class Int8OnlineLinearMethod(Int8LinearMethod):
    """For bf16/fp16/fp32 layers rounded to int8 at load, rotated in groups of ``config.rotation_group`` (a layer
    whose width it does not divide takes the largest power-of-4 group that does, at least 16, or no rotation).

    ``rounded``: per layer name, int8 values and scales chosen ahead of time (error-compensating rounding, not
    rotated: the config's ``rotation_group`` must be ``None`` for them); such a layer installs them instead of
    rounding its weight to the nearest values.
    """

    def __init__(self, config: Int8Config, kernel: str | None = None, rounded: dict | None = None) -> None:
        super().__init__(config, kernel)
        self.rounded = rounded if rounded is not None else {}

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, params_dtype=None, device=None
    ) -> None:
        dtype = params_dtype or torch.bfloat16
        layer.weight = _parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
        layer.input_scale = None

    def process_weights_after_loading(
        self, layer: nn.Module, name: str = "", quantize_device: Device = None, result_device: Device = None
    ) -> None:
        """Round ``layer.weight`` (on ``quantize_device`` if given) in place of it; the int8 weight goes to
        ``result_device`` (default: where the weight came from)."""
        what = name or type(layer).__name__
        weight = _checked_weight(layer, what)
        if not weight.dtype.is_floating_point or weight.dtype.itemsize < 2:
            raise ValueError(f"{what}: on-the-fly int8 needs a bf16/fp16/fp32 weight, got {weight.dtype}")
        home = torch.device(result_device) if result_device is not None else weight.device
        source = weight.detach()
        if quantize_device is not None:
            source = source.to(quantize_device)
        if not bool(torch.isfinite(weight_row_amax(source)).all()):
            raise ValueError(f"{what}: weight holds NaN or inf values; refusing to quantize it")
        chosen = self.rounded.get(what)
        if chosen is not None and chosen[0].dtype == torch.int8 and self.config.rotation_group is None:
            stored, scale = chosen
            if tuple(stored.shape) != tuple(weight.shape):
                raise ValueError(f"{what}: rounded weight {list(stored.shape)} does not fit {list(weight.shape)}")
            self._install(layer, stored.to(home), scale.to(home), None, what)
            return
        group = self.layer_group(source.shape[1])
        if group != self.config.rotation_group:
            logger.debug("%s: %d inputs, rotated in groups of %s", what, source.shape[1], group)
        # Group scales follow the rotation: an unrotated layer keeps one scale per row and channel.
        scale_group = group if self.config.grouped_scales else None
        stored, scale = quantize_int8_weight(source, self.config.per_channel, group, scale_group)
        self._install(layer, stored.to(home), scale.to(home), group, what)

    def layer_group(self, in_features: int) -> int | None:
        """The rotation group of a layer with ``in_features`` inputs under this config."""
        group = self.config.rotation_group
        if group is None or in_features % group == 0:
            return group
        return largest_group(in_features, group)


def normalize_int8_scale(scale: torch.Tensor | None, weight_shape: tuple[int, int], what: str) -> torch.Tensor:
    """An int8 weight's scale, stored as ``[]``, ``[1]``, ``[N]`` or ``[N, 1]`` (ComfyUI writes ``[N, 1]`` per
    channel), as float32 ``[]`` or ``[N]``, finite and positive; anything else is an error naming the layer."""
    if scale is None:
        raise ValueError(f"{what}: int8 weight has no weight_scale")
    out_features, in_features = weight_shape
    group = weight_group_of_scale(tuple(scale.shape), out_features, in_features, blocks=())
    if group is None:
        raise ValueError(
            f"{what}: weight_scale of shape {list(scale.shape)} fits no int8 granularity for weight "
            f"{list(weight_shape)} (expected [], [1], [{out_features}] or [{out_features}, 1])"
        )
    values = scale.detach().float().reshape((out_features,) if group.is_per_channel() else ())
    check_scale(values, f"{what}.weight_scale")
    return values.contiguous()
