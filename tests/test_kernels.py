"""Every kernel and granularity against a float32 reference, on inputs with outlier channels and tokens."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from helpers import mean_row_rel_err, outlier_input, random_linear, rel_err

from fp8_quant import Fp8Config, Fp8OnlineLinearMethod
from fp8_quant.kernels import (
    KERNEL_ENV,
    ChannelWiseScaledMMKernel,
    DequantLinearKernel,
    PerTensorScaledMMKernel,
    explain_choice,
    kernel_class,
    select_kernel,
)

CPU = torch.device("cpu")
# fp8 e4m3 has a 3-bit mantissa: a correct kernel lands near 0.035 on these inputs (weights and activations
# both quantized); a kernel that drops or misplaces a scale lands far above.
ERROR_BOUND = 0.05


def make_layer(config, kernel=None, in_features=256, out_features=512, bias=True, dtype=torch.float32, seed=1):
    reference = random_linear(in_features, out_features, bias=bias, seed=seed)
    layer = copy.deepcopy(reference).to(dtype)
    method = Fp8OnlineLinearMethod(config, kernel)
    method.process_weights_after_loading(layer, "layer")
    return reference, layer, method


def reference_output(reference, x):
    return F.linear(x.float(), reference.weight.float(), None if reference.bias is None else reference.bias.float())


CASES = [
    (PerTensorScaledMMKernel.name, "tensor", "tensor"),
    (ChannelWiseScaledMMKernel.name, "tensor", "tensor"),
    (ChannelWiseScaledMMKernel.name, "channel", "tensor"),
    (ChannelWiseScaledMMKernel.name, "tensor", "token"),
    (ChannelWiseScaledMMKernel.name, "channel", "token"),
    (DequantLinearKernel.name, "tensor", "tensor"),
    (DequantLinearKernel.name, "channel", "token"),
]


@pytest.mark.parametrize("kernel, weight_granularity, activation_granularity", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(37, 256), (2, 19, 256)])
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_matches_float_reference(kernel, weight_granularity, activation_granularity, dtype, shape, bias):
    config = Fp8Config(weight_granularity=weight_granularity, activation_granularity=activation_granularity)
    reference, layer, method = make_layer(config, kernel, bias=bias, dtype=dtype)
    chosen = kernel_class(kernel)
    if chosen.can_implement(layer.fp8.layer_config)[0] and chosen.is_supported(CPU, forced=True)[0]:
        assert type(method.kernel_for(layer, CPU)) is kernel_class(kernel)
    x = outlier_input(*shape, seed=11, dtype=dtype)
    out = method.apply(layer, x, layer.bias)
    assert out.dtype == dtype
    assert out.shape == (*shape[:-1], 512)
    assert rel_err(out, reference_output(reference, x)) < ERROR_BOUND


def test_rowwise_kernel_follows_a_changed_per_tensor_weight_scale():
    """The row-wise kernel keeps a per-tensor weight scale as a [1, N] row between calls (a copy per call costs a
    host-bound layer its time); a new or rewritten scale (a LoRA patch, a reload) must still take effect."""
    config = Fp8Config(weight_granularity="tensor", activation_granularity="token")
    reference, layer, method = make_layer(config, ChannelWiseScaledMMKernel.name, bias=False)
    if type(method.kernel_for(layer, CPU)) is not ChannelWiseScaledMMKernel:
        pytest.skip("this torch's CPU _scaled_mm takes per-tensor scales only")
    x = outlier_input(37, 256, seed=11)
    expected = reference_output(reference, x)
    first = method.apply(layer, x)
    assert rel_err(first, expected) < ERROR_BOUND
    torch.testing.assert_close(method.apply(layer, x), first)
    with torch.no_grad():
        layer.weight_scale.mul_(2.0)  # in place: the same tensor, a new version
    torch.testing.assert_close(method.apply(layer, x), 2 * first, rtol=1e-2, atol=1e-3)
    layer.weight_scale = torch.nn.Parameter(layer.weight_scale.detach() / 4, requires_grad=False)  # a new tensor
    torch.testing.assert_close(method.apply(layer, x), first / 2, rtol=1e-2, atol=1e-3)


def test_rowwise_kernel_takes_scales_made_under_inference_mode():
    """ComfyUI loads and runs models under torch.inference_mode: their scales are inference tensors, which have no
    version counter for the kernel's cached [1, N] row to read."""
    config = Fp8Config(weight_granularity="tensor", activation_granularity="token")
    with torch.inference_mode():
        reference, layer, method = make_layer(config, ChannelWiseScaledMMKernel.name, bias=False)
    if type(method.kernel_for(layer, CPU)) is not ChannelWiseScaledMMKernel:
        pytest.skip("this torch's CPU _scaled_mm takes per-tensor scales only")
    assert layer.weight_scale.is_inference()
    x = outlier_input(37, 256, seed=11)
    with torch.inference_mode():
        first = method.apply(layer, x)
        torch.testing.assert_close(method.apply(layer, x), first)
    assert rel_err(first, reference_output(reference, x)) < ERROR_BOUND


def test_bound_catches_a_missing_weight_scale():
    config = Fp8Config()
    reference, layer, method = make_layer(config, ChannelWiseScaledMMKernel.name)
    flat_scale = torch.full_like(layer.weight_scale, layer.weight_scale.mean())
    layer.weight_scale = torch.nn.Parameter(flat_scale, requires_grad=False)
    x = outlier_input(16, 256, seed=12)
    assert rel_err(method.apply(layer, x, layer.bias), reference_output(reference, x)) > ERROR_BOUND


def test_per_token_beats_per_tensor_through_the_layer():
    x = outlier_input(128, 256, seed=13)
    errors = {}
    for granularity in ("token", "tensor"):
        config = Fp8Config(activation_granularity=granularity)
        reference, layer, method = make_layer(config, ChannelWiseScaledMMKernel.name, bias=False)
        errors[granularity] = mean_row_rel_err(method.apply(layer, x), reference_output(reference, x))
    assert errors["token"] < 0.85 * errors["tensor"], errors


def test_dequant_fallback_keeps_the_numerics_contract():
    config = Fp8Config(round_activations_on_dequant=True)
    _, layer, _ = make_layer(config)
    x = outlier_input(3, 9, 256, seed=14)
    fast = Fp8OnlineLinearMethod(config, ChannelWiseScaledMMKernel.name).apply(layer, x, layer.bias)
    layer.fp8.kernels.clear()
    fallback = Fp8OnlineLinearMethod(config, DequantLinearKernel.name).apply(layer, x, layer.bias)
    # Row-wise _scaled_mm outputs bf16 (CUDA allows nothing else): the two differ by that rounding only.
    assert rel_err(fallback, fast) < 4e-3


def test_dequant_leaves_activations_unrounded_unless_asked():
    """Where the product is not fp8 (CPU, pre-Ada GPUs), rounding activations only adds error: by default the
    dequantize kernel multiplies them as they are, exactly like weight-only."""
    x = outlier_input(32, 256, seed=18)
    reference, layer, method = make_layer(Fp8Config(), DequantLinearKernel.name)
    weight_only = Fp8OnlineLinearMethod(Fp8Config(activation_scheme="none"), DequantLinearKernel.name)
    layer_weight_only = copy.deepcopy(layer)
    layer_weight_only.fp8.kernels.clear()
    layer_weight_only.fp8.layer_config = weight_only.layer_config(layer.weight, layer.weight_scale)
    unrounded = method.apply(layer, x, layer.bias)
    assert torch.equal(unrounded, weight_only.apply(layer_weight_only, x, layer.bias))
    _, rounded_layer, rounded = make_layer(
        Fp8Config(round_activations_on_dequant=True), DequantLinearKernel.name
    )
    expected = reference_output(reference, x)
    assert rel_err(unrounded, expected) < 0.8 * rel_err(rounded.apply(rounded_layer, x, rounded_layer.bias), expected)


def test_weight_only_runs_on_dequant_and_is_more_accurate():
    x = outlier_input(32, 256, seed=15)
    reference, layer, method = make_layer(Fp8Config(activation_scheme="none"), ChannelWiseScaledMMKernel.name)
    kernel_cls, why = explain_choice(layer.fp8.layer_config, CPU, ChannelWiseScaledMMKernel.name)
    assert kernel_cls is DequantLinearKernel and "weight-only" in why
    assert rel_err(method.apply(layer, x, layer.bias), reference_output(reference, x)) < 0.03


@pytest.mark.parametrize("output_dtype", [torch.bfloat16, torch.float32])
def test_config_output_dtype(output_dtype):
    config = Fp8Config(output_dtype=output_dtype)
    _, layer, method = make_layer(config, ChannelWiseScaledMMKernel.name, dtype=torch.float16)
    assert method.apply(layer, outlier_input(4, 256, dtype=torch.float16), layer.bias).dtype == output_dtype


def test_automatic_choice_on_cpu_is_dequant_with_reason():
    _, layer, _ = make_layer(Fp8Config())
    kernel_cls, why = explain_choice(layer.fp8.layer_config, CPU)
    assert kernel_cls is DequantLinearKernel
    assert "cpu has no FP8 tensor cores" in why


def test_kernels_say_device_support_apart_from_layer_support():
    _, layer, _ = make_layer(Fp8Config())
    assert PerTensorScaledMMKernel.is_supported(CPU) == (False, "cpu has no FP8 tensor cores")
    assert PerTensorScaledMMKernel.is_supported(CPU, forced=True) == (True, None)
    assert ChannelWiseScaledMMKernel.can_implement(layer.fp8.layer_config) == (True, None)
    ok, reason = PerTensorScaledMMKernel.can_implement(layer.fp8.layer_config)
    assert not ok and "per-channel" in reason
    assert DequantLinearKernel.is_supported(torch.device("meta")) == (True, None)


@pytest.mark.parametrize("in_features, out_features", [(40, 512), (256, 40)])
def test_unaligned_shape_falls_back_with_reason(in_features, out_features, caplog):
    config = Fp8Config()
    reference, layer, method = make_layer(config, ChannelWiseScaledMMKernel.name, in_features, out_features)
    kernel_cls, why = explain_choice(layer.fp8.layer_config, CPU, ChannelWiseScaledMMKernel.name)
    assert kernel_cls is DequantLinearKernel
    assert "divisible by 16" in why
    x = outlier_input(8, in_features, seed=16)
    with caplog.at_level(logging.INFO, logger="fp8_quant"):
        out = method.apply(layer, x, layer.bias)
    assert rel_err(out, reference_output(reference, x)) < ERROR_BOUND
    assert any("divisible by 16" in record.getMessage() for record in caplog.records)


def test_e5m2_weights_fall_back_from_scaled_mm():
    config = Fp8Config(weight_dtype=torch.float8_e5m2, weight_granularity="tensor", activation_granularity="tensor")
    reference, layer, method = make_layer(config, ChannelWiseScaledMMKernel.name)
    kernel_cls, why = explain_choice(layer.fp8.layer_config, CPU, ChannelWiseScaledMMKernel.name)
    assert kernel_cls is DequantLinearKernel and "e4m3fn" in why
    # The per-tensor kernel takes e5m2 weights against e4m3 activations.
    assert explain_choice(layer.fp8.layer_config, CPU, PerTensorScaledMMKernel.name)[0] is PerTensorScaledMMKernel
    x = outlier_input(8, 256, seed=17)
    assert rel_err(method.apply(layer, x, layer.bias), reference_output(reference, x)) < 0.08


def test_e5m2_pair_is_refused():
    from fp8_quant.kernels import FP8ScaledMMLinearLayerConfig
    from fp8_quant.scheme import PER_TENSOR, activation_key, weight_key

    config = FP8ScaledMMLinearLayerConfig(
        weight_key(torch.float8_e5m2, PER_TENSOR), activation_key(torch.float8_e5m2, False, PER_TENSOR), 64, 64
    )
    ok, reason = PerTensorScaledMMKernel.can_implement(config)
    assert not ok and "e5m2 x e5m2" in reason


def test_environment_variable_forces_kernel(monkeypatch):
    _, layer, _ = make_layer(Fp8Config(weight_granularity="tensor", activation_granularity="tensor"))
    monkeypatch.setenv(KERNEL_ENV, PerTensorScaledMMKernel.name)
    assert type(select_kernel(layer.fp8.layer_config, CPU)) is PerTensorScaledMMKernel
    monkeypatch.setenv(KERNEL_ENV, "auto")
    assert type(select_kernel(layer.fp8.layer_config, CPU)) is DequantLinearKernel
    monkeypatch.setenv(KERNEL_ENV, "cutlass9000")
    with pytest.raises(ValueError, match="cutlass9000"):
        select_kernel(layer.fp8.layer_config, CPU)


def test_unknown_forced_kernel_is_an_error():
    with pytest.raises(ValueError, match="allowed values"):
        kernel_class("fastest")
