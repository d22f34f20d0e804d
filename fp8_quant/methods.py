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

from .auto_scales import DEFAULT_POLICY, CalibrationTally, RuntimeActivationScale, choose_weight_group
from .choices import ActivationScheme
from .config import Fp8Config
from .fp8_utils import check_scale, is_fp8_dtype, quantize_weight, weight_row_amax
from .kernels import (
    FP8ScaledMMLinearKernel,
    FP8ScaledMMLinearLayerConfig,
    block_groups_at_speed,
    explain_choice,
    select_kernel,
)
from .layer_state import Fp8LayerState
from .params import Fp8LinearParams
from .prepared import prepare_call, serve_prepared
from .scheme import (
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
        static = self.config.activation_scheme is ActivationScheme.STATIC
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
        if self.config.activation_scheme is ActivationScheme.STATIC and input_scale is not None:
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
        self._install(layer, weight.detach().to(home).contiguous(), weight_scale.to(home), input_scale, what)

    def _install(
        self,
        layer: nn.Module,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        input_scale: torch.Tensor | None,
        name: str,
    ) -> None:
        # New Parameter objects, never in-place writes: a module shared with another model keeps its tensors.
        layer.weight = _parameter(weight)
        layer.weight_scale = _parameter(weight_scale)
        layer.input_scale = _parameter(input_scale) if input_scale is not None else None
        layer.fp8 = Fp8LayerState(self, self.layer_config(weight, weight_scale), name)

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

    def kernel_for(self, layer: nn.Module, device: torch.device) -> FP8ScaledMMLinearKernel:
        """The kernel that runs this layer on ``device`` now (made the first time: see ``_make_kernels``)."""
        state: Fp8LayerState = layer.fp8
        return state.kernels.get(device) or self._make_kernels(layer, state, device)

    def _make_kernels(self, layer: nn.Module, state: Fp8LayerState, device: torch.device) -> FP8ScaledMMLinearKernel:
        """The layer's kernel on ``device``. A layer that learns its activation scale (no ``input_scale``) starts on
        the dynamic kernel with its learning quantizer (``auto_scales``), which switches it to the per-tensor kernel
        made here once its scale is static; where the kernel keeps activations in high precision nothing is learnt."""
        config = state.layer_config
        if not self._learns_scales or layer.input_scale is not None:
            kernel = select_kernel(config, device, self.kernel)
            state.kernels[device] = kernel
            return kernel
        dynamic_config = dataclasses.replace(config, activation_quant_key=self._dynamic_key)
        dynamic = select_kernel(dynamic_config, device, self.kernel)
        state.kernels[device] = dynamic
        if dynamic.input_quant is None:  # activations stay in high precision: no scale to learn
            return dynamic
        if state.activation is None:
            may_stay_dynamic = self.config.activation_scheme is ActivationScheme.CALIBRATED
            state.activation = RuntimeActivationScale(
                DEFAULT_POLICY, may_stay_dynamic, self.calibration, state.name, self.config.activation_group,
                state.kernels,
            )  # fmt: skip
        state.activation.buffers_on(device)  # its statistics live on the device, made before any compile
        static = dataclasses.replace(config, activation_quant_key=kFp8StaticTensorSym)
        state.activation.use_static_kernel(device, select_kernel(static, device, self.kernel))
        return state.kernels[device]

    def explain_kernel(self, layer: nn.Module, device: torch.device, forced: str | None = None) -> str:
        """The sentence saying which kernel runs this layer on ``device`` and why (for reports)."""
        return explain_choice(layer.fp8.layer_config, device, forced)[1]

    def prepare_kernels(self, layer: nn.Module, device: torch.device | str) -> None:
        """Choose the layer's kernels for ``device`` now, outside any ``torch.compile`` trace (loaders call this with
        the compute device, so that a compiled first forward finds them made)."""
        self.kernel_for(layer, compute_device(device))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return apply_prepared(self, layer, x, bias)

    def apply_params(
        self, layer: nn.Module, params: Fp8LinearParams, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The product with tensors other than the layer's own (a LoRA-patched weight, an offloaded one); ``params``
        carries the layer's learning activation quantizer, if it has one."""
        state: Fp8LayerState = layer.fp8
        kernel = state.kernels.get(x.device)
        if kernel is None:  # the first call on this device (no prepare_kernels): its quantizer is made now
            kernel = self.kernel_for(layer, x.device)
            params = params._replace(activation_quantizer=state.activation)
        return kernel.apply(params, x, bias)


def apply_prepared(method, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The layer's product through its prepared call where that still holds, else the general path (after which
    a prepared call is made for the next call: ``prepared``)."""
    state: Fp8LayerState = layer.fp8
    out = serve_prepared(layer, state, x, bias)
    if out is not None:
        return out
    out = method.apply_params(layer, Fp8LinearParams.from_layer(layer), x, bias)
    prepare_call(layer, state, x, bias)
    return out


def compute_device(device: torch.device | str) -> torch.device:
    """``device`` as the forward will see it (``cuda`` with its index)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


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
            self._install(layer, fp8_weight.to(home), weight_scale.to(home), None, what)
            return
        group, fit = self.config.weight_group, False
        if self.config.weight_granularity is None:  # auto: per layer
            choice = choose_weight_group(
                source, groups_at_speed=block_groups_at_speed(source.device), rows=row_amax
            )
            group, fit = choice.group, choice.fit
            logger.debug("%s: %s", what, choice.reason)
        fp8_weight, weight_scale = quantize_weight(source, self.config.weight_dtype, group, fit=fit)
        self._install(layer, fp8_weight.to(home), weight_scale.to(home), None, what)


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
