"""Linear methods: they own an fp8 layer's parameters and route its product to a kernel.

``Fp8LinearMethod`` takes weights that are already fp8 (a pre-quantized checkpoint); ``Fp8OnlineLinearMethod``
quantizes a bf16/fp16/fp32 weight when it is loaded, one layer at a time, so a model never needs to exist in
full precision and in fp8 at once. Both end with the layout of ``params.Fp8LinearParams``, which every kernel
reads. Which layer gets which method is decided in ``dispatch``, not here.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from .auto_scales import DEFAULT_POLICY, DYNAMIC, STATIC, CalibrationTally, RuntimeActivationScale, choose_weight_group
from .config import AUTO, Fp8Config
from .fp8_utils import check_scale, is_fp8_dtype, quantize_weight, weight_row_amax
from .kernels import (
    FP8ScaledMMLinearKernel,
    FP8ScaledMMLinearLayerConfig,
    block_groups_at_speed,
    explain_choice,
    select_kernel,
)
from .params import Fp8LinearParams
from .scheme import (
    QuantKey,
    activation_key,
    expected_scale_shapes,
    kFp8StaticTensorSym,
    weight_group_of_scale,
    weight_key,
    weight_scale_shape,
)

logger = logging.getLogger(__name__)
Dtype = torch.dtype | None
Device = torch.device | str | None
# Layer name -> (fp8 weight [N, K], weight scale): values chosen ahead of time (``gptq``) instead of plain rounding.
RoundedWeights = dict[str, tuple[torch.Tensor, torch.Tensor]]


class Fp8LinearMethod:
    """For layers whose checkpoint already holds an fp8 weight and its scales."""

    def __init__(self, config: Fp8Config, kernel: str | None = None) -> None:
        self.config = config
        self.kernel = kernel
        self.calibration = CalibrationTally()
        # Worked out once: the forward of a host-bound layer (few tokens) pays for every object it builds.
        self._learns_scales = config.learns_activation_scales
        self._dynamic_key = activation_key(torch.float8_e4m3fn, False, config.activation_group)

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, params_dtype: Dtype = None, device=None
    ) -> None:
        """Register empty parameters of the checkpoint's shapes, to be filled by a state dict load."""
        layer.weight = _parameter(torch.empty(out_features, in_features, dtype=self.config.weight_dtype, device=device))
        scale_shape = weight_scale_shape(self.config.weight_group, out_features, in_features)
        layer.weight_scale = _parameter(torch.ones(scale_shape, dtype=torch.float32, device=device))
        static = self.config.activation_scheme == "static"
        layer.input_scale = _parameter(torch.ones((), dtype=torch.float32, device=device)) if static else None

    def process_weights_after_loading(
        self, layer: nn.Module, name: str = "", quantize_device: Device = None, result_device: Device = None
    ) -> None:
        """Validate what was loaded and normalise it: contiguous [N, K] fp8, float32 scales of the layer's group.

        ``result_device``: where the layer's tensors end up (default: where the weight came from)."""
        what = name or type(layer).__name__
        weight = _checked_weight(layer, what)
        if not is_fp8_dtype(weight.dtype):
            raise ValueError(f"{what}: Fp8LinearMethod expects an fp8 weight, got {weight.dtype}")
        weight_scale = normalize_weight_scale(getattr(layer, "weight_scale", None), tuple(weight.shape), what)
        input_scale = getattr(layer, "input_scale", None)
        if self.config.activation_scheme == "static" and input_scale is not None:
            input_scale = input_scale.detach().float()
            if input_scale.numel() != 1:
                raise ValueError(f"{what}: input_scale must be one scalar, got shape {tuple(input_scale.shape)}")
            input_scale = input_scale.reshape(())
            check_scale(input_scale, f"{what}.input_scale")
        else:
            input_scale = None
        home = torch.device(result_device) if result_device is not None else weight.device
        if input_scale is not None:
            input_scale = input_scale.to(home)
        self._install(layer, weight.detach().to(home).contiguous(), weight_scale.to(home), input_scale)
        layer.fp8_name = what

    def _install(
        self,
        layer: nn.Module,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        input_scale: torch.Tensor | None,
    ) -> None:
        # New Parameter objects, never in-place writes: a module shared with another model keeps its tensors.
        layer.weight = _parameter(weight)
        layer.weight_scale = _parameter(weight_scale)
        layer.input_scale = _parameter(input_scale) if input_scale is not None else None
        layer.fp8_layer_config = self.layer_config(weight, weight_scale)
        layer.fp8_kernels = {}
        layer.__dict__.pop("fp8_activation_scale", None)

    def layer_config(self, weight: torch.Tensor, weight_scale: torch.Tensor) -> FP8ScaledMMLinearLayerConfig:
        """The layer's own scheme: its actual scale shape wins over the config (checkpoints mix granularities)."""
        group = weight_group_of_scale(tuple(weight_scale.shape), weight.shape[0], weight.shape[1])
        assert group is not None  # normalize_weight_scale has checked it
        return FP8ScaledMMLinearLayerConfig(
            weight_quant_key=weight_key(weight.dtype, group),
            activation_quant_key=self.config.activation_quant_key,
            in_features=weight.shape[1],
            out_features=weight.shape[0],
            out_dtype=self.config.output_dtype,
            round_activations_on_dequant=self.config.round_activations_on_dequant,
        )

    def kernel_for(
        self, layer: nn.Module, device: torch.device, activation_key: QuantKey | None = None
    ) -> FP8ScaledMMLinearKernel:
        """The kernel for this layer on ``device`` (for another activation scheme than its own, if given)."""
        kernels: dict = layer.fp8_kernels
        kernel = kernels.get((device, activation_key))
        if kernel is None:
            config = layer.fp8_layer_config
            if activation_key is not None:
                config = dataclasses.replace(config, activation_quant_key=activation_key)
            kernel = select_kernel(config, device, self.kernel)
            kernels[(device, activation_key)] = kernel
        return kernel

    def explain_kernel(self, layer: nn.Module, device: torch.device, forced: str | None = None) -> str:
        """The sentence saying which kernel runs this layer on ``device`` and why (for reports)."""
        return explain_choice(layer.fp8_layer_config, device, forced)[1]

    def prepare_kernels(self, layer: nn.Module, device: torch.device | str) -> None:
        """Choose the layer's kernels for ``device`` now, outside any ``torch.compile`` trace (loaders call this with
        the compute device, so that a compiled first forward finds them made)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.kernel_for(layer, device)
        if self._learns_scales and layer.input_scale is None:
            dynamic = self.kernel_for(layer, device, self._dynamic_key)
            self.kernel_for(layer, device, kFp8StaticTensorSym)
            if dynamic.input_quant is not None:  # its statistics live on the device, made before any compile
                self._activation_scale(layer).buffers_on(device)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.apply_params(layer, Fp8LinearParams.from_layer(layer), x, bias)

    def apply_params(
        self, layer: nn.Module, params: Fp8LinearParams, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The product with tensors other than the layer's own (a LoRA-patched weight, an offloaded one)."""
        if not self._learns_scales or params.input_scale is not None:
            return self.kernel_for(layer, x.device).apply(params, x, bias)
        dynamic = self.kernel_for(layer, x.device, self._dynamic_key)
        if dynamic.input_quant is None:  # activations stay in high precision: no scale to learn
            return dynamic.apply(params, x, bias)
        return self._apply_learnt_scale(layer, dynamic, params, x, bias)

    def _activation_scale(self, layer: nn.Module) -> RuntimeActivationScale:
        state = layer.__dict__.get("fp8_activation_scale")
        if state is None:
            may_stay_dynamic = self.config.activation_scheme == "calibrated"
            state = RuntimeActivationScale(DEFAULT_POLICY, may_stay_dynamic, self.calibration, _layer_name(layer))
            layer.fp8_activation_scale = state
        return state

    def _apply_learnt_scale(
        self,
        layer: nn.Module,
        dynamic: FP8ScaledMMLinearKernel,
        params: Fp8LinearParams,
        x: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """A layer whose activation scale is learnt while it runs (``auto_scales``): observe, then static or not."""
        compiling = torch.compiler.is_compiling()
        state = layer.__dict__.get("fp8_activation_scale")
        if state is None or (compiling and state.history is None):
            if compiling:  # no new state inside a compiled graph (prepare_kernels makes it): dynamic there
                return dynamic.apply(params, x, bias)
            state = self._activation_scale(layer)
        phase = state.phase
        if phase == STATIC:
            static = params._replace(activation_quantizer=state.quantize_static)
            out = self.kernel_for(layer, x.device, kFp8StaticTensorSym).apply(static, x, bias)
        elif phase == DYNAMIC:
            out = dynamic.apply(params, x, bias)
        else:
            if not compiling:
                state.buffers_on(x.device)
            observing = params._replace(activation_quantizer=state.observing_quantizer(dynamic.input_quant))
            out = dynamic.apply(observing, x, bias)
        if not compiling:
            state.after_call()
            if state.phase == STATIC and phase != STATIC:
                self.kernel_for(layer, x.device, kFp8StaticTensorSym)  # made now, not inside a compiled trace
        return out


class Fp8OnlineLinearMethod(Fp8LinearMethod):
    """For bf16/fp16/fp32 layers quantized at load: weight scales of the config's granularity, from the weight.

    ``rounded``: per layer name, fp8 values and scales chosen ahead of time (error-compensating rounding); such a
    layer installs them instead of rounding its weight to the nearest fp8 values.
    """

    def __init__(self, config: Fp8Config, kernel: str | None = None, rounded: RoundedWeights | None = None) -> None:
        super().__init__(config, kernel)
        self.rounded = rounded if rounded is not None else {}

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, params_dtype: Dtype = None, device=None
    ) -> None:
        dtype = params_dtype or torch.bfloat16
        layer.weight = _parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
        layer.input_scale = None

    def process_weights_after_loading(
        self, layer: nn.Module, name: str = "", quantize_device: Device = None, result_device: Device = None
    ) -> None:
        """Quantize ``layer.weight`` (on ``quantize_device`` if given, e.g. the GPU for speed) in place of it; the
        fp8 weight goes to ``result_device`` (default: where the weight came from). A loader that will put the model
        on the GPU anyway keeps it there, instead of a copy back to the host and another one over later.

        ``auto`` granularity asks the device the layer will run on (``quantize_device``, else the weight's own, as the
        nodes pass them) whether groups of 128 inputs run at full speed there."""
        what = name or type(layer).__name__
        weight = _checked_weight(layer, what)
        if not weight.dtype.is_floating_point or is_fp8_dtype(weight.dtype):
            raise ValueError(f"{what}: online quantization needs a bf16/fp16/fp32 weight, got {weight.dtype}")
        home = torch.device(result_device) if result_device is not None else weight.device
        source = weight.detach()
        if quantize_device is not None:
            source = source.to(quantize_device)
        row_amax = weight_row_amax(source)  # NaN and inf propagate: one small tensor says if the weight is finite
        if not bool(torch.isfinite(row_amax).all()):
            raise ValueError(f"{what}: weight holds NaN or inf values; refusing to quantize it")
        if what in self.rounded:
            fp8_weight, weight_scale = self.rounded[what]
            if tuple(fp8_weight.shape) != tuple(weight.shape):
                raise ValueError(f"{what}: rounded weight {list(fp8_weight.shape)} does not fit {list(weight.shape)}")
            self._install(layer, fp8_weight.to(home), weight_scale.to(home), None)
            layer.fp8_name = what
            return
        group, fit = self.config.weight_group, False
        if self.config.weight_granularity == AUTO:
            choice = choose_weight_group(
                source, groups_at_speed=block_groups_at_speed(source.device), rows=row_amax
            )
            group, fit = choice.group, choice.fit
            logger.debug("%s: %s", what, choice.reason)
        fp8_weight, weight_scale = quantize_weight(source, self.config.weight_dtype, group, fit=fit)
        self._install(layer, fp8_weight.to(home), weight_scale.to(home), None)
        layer.fp8_name = what


def _layer_name(layer: nn.Module) -> str:
    return layer.__dict__.get("fp8_name", type(layer).__name__)


def _parameter(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


def _checked_weight(layer: nn.Module, what: str) -> torch.Tensor:
    weight = getattr(layer, "weight", None)
    if weight is None or weight.dim() != 2:
        shape = None if weight is None else tuple(weight.shape)
        raise ValueError(f"{what}: expected a 2-D weight [out, in], got {shape}")
    return weight


def normalize_weight_scale(weight_scale: torch.Tensor | None, weight_shape: tuple[int, int], what: str) -> torch.Tensor:
    """Scales arrive as [], [1], [N], [N, 1] or blocks; stored as [], [N] or blocks. Anything else is an error."""
    if weight_scale is None:
        raise ValueError(f"{what}: fp8 weight has no weight_scale")
    scale = weight_scale.detach().float()
    out_features, in_features = weight_shape
    group = weight_group_of_scale(tuple(scale.shape), out_features, in_features)
    if group is None:
        raise ValueError(
            f"{what}: weight_scale of shape {tuple(scale.shape)} fits no granularity for weight "
            f"{list(weight_shape)} (expected {expected_scale_shapes(out_features, in_features)})"
        )
    scale = scale.reshape(weight_scale_shape(group, out_features, in_features))
    check_scale(scale, f"{what}.weight_scale")
    return scale.contiguous()
