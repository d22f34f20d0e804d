"""The rotated int8 method on the CPU: the rotation against an explicit Hadamard matrix, the rounding rules, and
the layer's output against a float32 reference on inputs with outliers."""

from __future__ import annotations

import pytest
import torch
from helpers import explicit_hadamard, outlier_input, random_linear, rel_err

from fp8_quant.config import Int8Config, QuantFormat, parse_quant_format
from fp8_quant.kernels.int8_mm import INT8_KERNELS, Int8DequantKernel, IntMMKernel
from fp8_quant.kernels.selection import explain_choice
from fp8_quant.methods_int8 import Int8LinearMethod, Int8OnlineLinearMethod, normalize_int8_scale
from fp8_quant.params import Fp8LinearParams
from fp8_quant.quant_int8 import dequantize_int8_weight, quantize_int8_rows, quantize_int8_weight
from fp8_quant.rotation import check_group_size, largest_group, rotate


@pytest.mark.parametrize("group", [4, 16, 64, 256])
def test_rotation_is_the_explicit_regular_hadamard_per_group(group):
    x = torch.randn(3, 2 * group, dtype=torch.float64, generator=torch.Generator().manual_seed(group))
    h = explicit_hadamard(group)
    expected = (x.reshape(3, 2, group) @ h).reshape(3, 2 * group)
    assert torch.allclose(rotate(x, group).double(), expected, atol=1e-5)
    assert torch.allclose(h @ h.T, torch.eye(group, dtype=torch.float64), atol=1e-12)  # orthonormal
    assert torch.allclose(rotate(rotate(x, group), group).double(), x, atol=1e-5)  # its own inverse


def test_rotation_rows_sum_alike_so_it_is_the_regular_not_the_sylvester_matrix():
    h = explicit_hadamard(16)
    assert torch.allclose(h.sum(dim=1), torch.full((16,), h.sum(dim=1)[0].item(), dtype=torch.float64))
    ones = torch.ones(1, 16)
    assert torch.allclose(rotate(ones, 16), ones @ h.float(), atol=1e-6)  # Sylvester's would give [4, 0, ..., 0]


@pytest.mark.parametrize(("group", "width", "words"), [(128, 256, "power of 4"), (256, 320, "does not divide")])
def test_bad_rotation_groups_are_errors_naming_the_option(group, width, words):
    with pytest.raises(ValueError, match=rf"convrot_groupsize: .*{words}"):
        check_group_size(group, width, "convrot_groupsize")
    with pytest.raises(ValueError, match="rotation_group"):
        Int8Config(rotation_group=3)


def test_largest_group_falls_back_to_smaller_powers_of_four():
    assert largest_group(5120) == 256
    assert largest_group(320) == 64
    assert largest_group(48) == 16
    assert largest_group(40) is None


def test_activation_rows_round_to_int8_with_amax_over_127():
    x = torch.tensor([[0.5, -1.27, 0.004, 0.0], [0.0, 0.0, 0.0, 0.0]])
    q, scale = quantize_int8_rows(x)
    assert torch.allclose(scale[0], torch.tensor([0.01]))
    assert q[0].tolist() == [50, -127, 0, 0] and q[1].tolist() == [0, 0, 0, 0]
    assert bool((scale > 0).all())  # an all-zero row still gets a positive scale


def test_weight_roundtrip_through_the_rotation_is_close_and_scales_are_per_channel():
    weight = random_linear(512, 64).weight.detach()
    stored, scale = quantize_int8_weight(weight, per_channel=True, group=256)
    assert stored.dtype == torch.int8 and scale.shape == (64,)
    assert stored.abs().amax(dim=1).eq(127).all()
    back = dequantize_int8_weight(stored, scale, 256)
    assert rel_err(back, weight) < 0.01
    _, tensor_scale = quantize_int8_weight(weight, per_channel=False)
    assert tensor_scale.shape == ()


def emulated_int8_linear(x, weight, bias, group, per_channel=True):
    """An independent reading of the contract: explicit Hadamard matrix, float64, row and column scales."""
    h = explicit_hadamard(group) if group else None
    x64, w64 = x.double(), weight.double()
    if h is not None:
        x64 = (x64.reshape(x.shape[0], -1, group) @ h).reshape(x.shape)
        w64 = (w64.reshape(w64.shape[0], -1, group) @ h).reshape(w64.shape)
    w_scale = (w64.abs().amax(dim=1, keepdim=True) if per_channel else w64.abs().amax()) / 127
    x_scale = x64.abs().amax(dim=1, keepdim=True) / 127
    qw = torch.round(w64 / w_scale).clamp(-127, 127)
    qx = torch.round(x64 / x_scale).clamp(-127, 127)
    return (qx @ qw.T) * x_scale * w_scale.reshape(1, -1) + bias.double()


def online_layer(linear: torch.nn.Linear, config: Int8Config) -> torch.nn.Linear:
    method = Int8OnlineLinearMethod(config)
    method.process_weights_after_loading(linear, "layer")
    return linear


@pytest.mark.parametrize("group", [256, 64, None])
def test_online_int8_layer_matches_the_emulated_contract_and_fp32(group):
    reference = random_linear(512, 96, seed=3)
    x = outlier_input(40, 512, seed=4)
    expected_fp32 = reference(x).detach()
    emulated = emulated_int8_linear(x, reference.weight.detach(), reference.bias.detach(), group)
    layer = online_layer(random_linear(512, 96, seed=3), Int8Config(rotation_group=group))
    out = layer.fp8.method.apply(layer, x, layer.bias)
    assert out.dtype == torch.float32 and out.shape == (40, 96)
    # the same rounding as the contract says, up to a few values that float32 rotation puts across a .5 boundary
    assert rel_err(out, emulated) < 2e-4
    assert rel_err(out, expected_fp32) < (0.02 if group else 0.06)


def test_rotation_lowers_the_error_on_inputs_with_outlier_channels():
    x = outlier_input(64, 1024, seed=5)
    errors = {}
    for group in (None, 256):
        reference = random_linear(1024, 128, seed=6)
        expected = reference(x).detach()
        layer = online_layer(random_linear(1024, 128, seed=6), Int8Config(rotation_group=group))
        errors[group] = rel_err(layer.fp8.method.apply(layer, x, layer.bias), expected)
    assert errors[256] < 0.5 * errors[None], errors


def test_int_mm_kernel_gives_the_dequantize_kernels_numbers():
    """The GPU kernel's code (padding of short calls, the transposed weight, the epilogue) run on this CPU's
    ``torch._int_mm``: the same output as the fallback for every row count, short calls included."""
    layer = online_layer(random_linear(256, 64, seed=7), Int8Config())
    config = layer.fp8.layer_config
    fast, fallback = IntMMKernel(config, torch.device("cpu")), Int8DequantKernel(config, torch.device("cpu"))
    params = Fp8LinearParams.from_layer(layer)
    for rows in (1, 16, 17, 100):
        x = outlier_input(rows, 256, seed=rows) if rows > 1 else torch.randn(1, 256)
        assert rel_err(fast.apply(params, x, layer.bias), fallback.apply(params, x, layer.bias)) < 1e-6


def test_weight_only_int8_keeps_activations_and_is_more_accurate():
    reference = random_linear(512, 64, seed=8)
    x = outlier_input(32, 512, seed=9)
    expected = reference(x).detach()
    dynamic = online_layer(random_linear(512, 64, seed=8), Int8Config())
    weight_only = online_layer(random_linear(512, 64, seed=8), Int8Config(activation_scheme="none"))
    kernel = weight_only.fp8.method.kernel_for(weight_only, torch.device("cpu"))
    assert kernel.input_quant is None
    err_dynamic = rel_err(dynamic.fp8.method.apply(dynamic, x, dynamic.bias), expected)
    err_weight_only = rel_err(weight_only.fp8.method.apply(weight_only, x, weight_only.bias), expected)
    assert err_weight_only < err_dynamic < 0.02


def test_cpu_chooses_the_dequantize_kernel_and_says_why():
    layer = online_layer(random_linear(256, 64), Int8Config())
    kernel, why = explain_choice(layer.fp8.layer_config, "cpu", None, INT8_KERNELS)
    assert kernel is Int8DequantKernel and "int8 tensor cores" in why
    odd = online_layer(random_linear(256, 60), Int8Config())
    assert "divisible by 8" in IntMMKernel.can_implement(odd.fp8.layer_config)[1]
    forced, why = explain_choice(layer.fp8.layer_config, "cpu", "scaled_mm_tensor", INT8_KERNELS)
    assert forced is Int8DequantKernel and "forced scaled_mm_tensor: not a kernel for these weights" in why


def test_stored_int8_layer_takes_comfyui_scale_shapes_and_refuses_others():
    weight = random_linear(256, 32).weight.detach()
    stored, scale = quantize_int8_weight(weight, per_channel=True, group=256)
    for shape in ((32,), (32, 1)):
        layer = torch.nn.Linear(256, 32)
        layer.weight = torch.nn.Parameter(stored, requires_grad=False)
        layer.weight_scale = torch.nn.Parameter(scale.reshape(shape), requires_grad=False)
        Int8LinearMethod(Int8Config()).process_weights_after_loading(layer, "blocks.0.q")
        assert layer.weight_scale.shape == (32,) and layer.fp8.layer_config.rotation_group == 256
    assert normalize_int8_scale(torch.tensor([0.5]), (32, 256), "x").shape == ()
    with pytest.raises(ValueError, match=r"blocks\.0\.q: weight_scale of shape \[2, 2\]"):
        normalize_int8_scale(torch.ones(2, 2), (32, 256), "blocks.0.q")
    with pytest.raises(ValueError, match=r"blocks\.0\.q\.weight_scale: scale must be finite"):
        normalize_int8_scale(torch.zeros(32), (32, 256), "blocks.0.q")
    layer = torch.nn.Linear(320, 32)
    layer.weight = torch.nn.Parameter(torch.zeros(32, 320, dtype=torch.int8), requires_grad=False)
    layer.weight_scale = torch.nn.Parameter(torch.ones(32), requires_grad=False)
    with pytest.raises(ValueError, match=r"blocks\.1\.k: rotation group 256 does not divide the layer's 320"):
        Int8LinearMethod(Int8Config()).process_weights_after_loading(layer, "blocks.1.k")


def test_quant_format_is_parsed_once_into_a_typed_value():
    assert parse_quant_format("int8") is QuantFormat.INT8_ROTATED
    assert parse_quant_format("FP8") is QuantFormat.FP8
    with pytest.raises(ValueError, match=r"quant_format: 'int4' is not allowed"):
        parse_quant_format("int4")


def test_on_the_fly_int8_rotated_is_a_core_choice_and_beats_fp8_on_outliers():
    """``quant_format`` int8_rotated in the core API: a built model's linears rounded to int8 rotated (an odd width
    gets a smaller group), more accurate than fp8 auto on inputs with outlier channels; the options int8 has no
    form for are errors naming them."""
    from fp8_quant import Fp8Recipe, UserOptions, prepare_model_for_fp8
    from fp8_quant.config import online_config

    x = outlier_input(64, 1024, seed=11)
    errors = {}
    for fmt in ("fp8", "int8_rotated"):
        model = torch.nn.Sequential(random_linear(1024, 320, seed=12), torch.nn.GELU(), random_linear(320, 64, seed=13))
        expected = model(x).detach()
        report = prepare_model_for_fp8(model, Fp8Recipe(online=online_config(UserOptions(quant_format=fmt))))
        errors[fmt] = rel_err(model(x).detach(), expected)
        assert report.formats() == fmt.removesuffix("_rotated")
    assert model[0].fp8.layer_config.rotation_group == 256 and model[2].fp8.layer_config.rotation_group == 64
    assert errors["int8_rotated"] < 0.7 * errors["fp8"], errors
    with pytest.raises(ValueError, match=r"activation_scheme: 'static' has no int8 form"):
        online_config(UserOptions(quant_format="int8", activation_scheme="static"))
    with pytest.raises(ValueError, match=r"weight_granularity: 'block' has no int8 form"):
        online_config(UserOptions(quant_format="int8", weight_granularity="block"))


def test_lora_protocol_of_a_rotated_int8_layer_goes_through_the_rotation():
    """ComfyUI's patcher on an int8 layer: ``convert_weight`` gives the real (un-rotated) values, ``set_weight``
    stores patched values rotated and rounded again with a scale of their own, and the forward follows the patch."""
    from nodes.fp8_linear import fp8_class_for

    reference = random_linear(512, 64, seed=20)
    layer = fp8_class_for(torch.nn.Linear)(512, 64)
    layer.load_state_dict(reference.state_dict())
    method = Int8OnlineLinearMethod(Int8Config())
    method.process_weights_after_loading(layer, "layer")
    real = layer.convert_weight(layer.weight.float())
    assert rel_err(real, reference.weight.detach()) < 0.01  # un-rotated: a rotated weight would be ~1.4 away
    patched = real + 0.5 * torch.randn(64, 512, generator=torch.Generator().manual_seed(21)) / 512**0.5
    layer.set_weight(patched)
    assert layer.weight.dtype == torch.int8 and rel_err(layer.current_weight_scale(), layer.weight_scale) > 0.01
    x = outlier_input(32, 512, seed=22)
    assert rel_err(layer(x).detach(), torch.nn.functional.linear(x, patched, layer.bias).detach()) < 0.02


def emulated_grouped_int8_linear(x, weight, bias, group):
    """The group-scale contract read independently: explicit Hadamard matrix, float64, one scale per row (and per
    output channel) and group of ``group`` inputs, summed group by group."""
    h = explicit_hadamard(group)
    x64 = (x.double().reshape(x.shape[0], -1, group) @ h)  # [M, groups, g]
    w64 = (weight.double().reshape(weight.shape[0], -1, group) @ h)  # [N, groups, g]
    x_scale = x64.abs().amax(dim=2, keepdim=True) / 127
    w_scale = w64.abs().amax(dim=2, keepdim=True) / 127
    qx = torch.round(x64 / x_scale).clamp(-127, 127) * x_scale
    qw = torch.round(w64 / w_scale).clamp(-127, 127) * w_scale
    return torch.einsum("mgk,ngk->mn", qx, qw) + bias.double()


@pytest.mark.parametrize("group", [256, 64])
def test_group_scales_follow_the_emulated_contract_and_lower_the_error(group):
    """``activation_granularity`` group for int8: one scale per row and rotation group on both operands, the
    output of the independent float64 reading, and less error vs fp32 than one scale per row on inputs with
    outlier channels (the reason the setting exists)."""
    width = 1024
    x = outlier_input(48, width, seed=30)
    reference = random_linear(width, 96, seed=31)
    expected = reference(x).detach().double()
    errors = {}
    for granularity in ("token", "group"):
        layer = online_layer(
            random_linear(width, 96, seed=31), Int8Config(rotation_group=group, activation_granularity=granularity)
        )
        out = layer.fp8.method.apply(layer, x, layer.bias)
        errors[granularity] = rel_err(out, expected)
    assert tuple(layer.weight_scale.shape) == (96, width // group)
    assert layer.fp8.layer_config.scale_group == group
    emulated = emulated_grouped_int8_linear(x, reference.weight.detach(), reference.bias.detach(), group)
    assert rel_err(out, emulated) < 2e-4
    assert errors["group"] < 0.9 * errors["token"], errors


def test_group_scales_option_is_parsed_for_int8_and_refused_where_it_has_no_meaning():
    from fp8_quant import UserOptions
    from fp8_quant.config import online_config

    config = online_config(UserOptions(quant_format="int8_rotated", activation_granularity="group"))
    assert config.grouped_scales and "per-token and rotation group" in config.describe()
    assert not online_config(UserOptions(quant_format="int8_rotated")).grouped_scales
    with pytest.raises(ValueError, match=r"activation_granularity: 'group' .* weight_granularity 'tensor'"):
        online_config(UserOptions(quant_format="int8", activation_granularity="group", weight_granularity="tensor"))
    with pytest.raises(ValueError, match=r"activation_granularity: 'group' .* activation_scheme 'none'"):
        online_config(UserOptions(quant_format="int8", activation_granularity="group", activation_scheme="none"))
    with pytest.raises(ValueError, match=r"activation_granularity: 'tensor' has no int8 form"):
        online_config(UserOptions(quant_format="int8", activation_granularity="tensor"))


def test_lora_protocol_of_a_group_scaled_int8_layer_keeps_group_scales():
    from nodes.fp8_linear import fp8_class_for

    reference = random_linear(512, 64, seed=40)
    layer = fp8_class_for(torch.nn.Linear)(512, 64)
    layer.load_state_dict(reference.state_dict())
    method = Int8OnlineLinearMethod(Int8Config(activation_granularity="group"))
    method.process_weights_after_loading(layer, "layer")
    real = layer.convert_weight(layer.weight.float())
    assert rel_err(real, reference.weight.detach()) < 0.01
    patched = real + 0.5 * torch.randn(64, 512, generator=torch.Generator().manual_seed(41)) / 512**0.5
    layer.set_weight(patched)
    assert layer.weight.dtype == torch.int8 and tuple(layer.current_weight_scale().shape) == (64, 2)
    x = outlier_input(32, 512, seed=42)
    assert rel_err(layer(x).detach(), torch.nn.functional.linear(x, patched, layer.bias).detach()) < 0.02
