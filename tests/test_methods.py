import pytest
import torch
from helpers import outlier_input, random_linear, rel_err

from fp8_quant import Fp8Config, Fp8LinearMethod, Fp8OnlineLinearMethod
from fp8_quant.fp8_utils import quantize_weight
from fp8_quant.kernels import ChannelWiseScaledMMKernel, PerTensorScaledMMKernel


class Holder(torch.nn.Module):
    pass


def prequantized_layer(config, reference, scale_shape=None, input_scale=None):
    """A layer as a checkpoint loader builds it: create_weights, then load_state_dict of fp8 tensors."""
    layer = Holder()
    method = Fp8LinearMethod(config, ChannelWiseScaledMMKernel.name)
    method.create_weights(layer, reference.in_features, reference.out_features)
    weight, scale = quantize_weight(reference.weight.detach(), group=config.weight_group)
    state = {"weight": weight, "weight_scale": scale.reshape(scale_shape) if scale_shape else scale}
    if input_scale is not None:
        state["input_scale"] = input_scale
    if scale_shape is not None and tuple(scale_shape) != tuple(layer.weight_scale.shape):
        # Checkpoints store scales as [N, 1] or [1] too; readers assign them as they are.
        layer.weight_scale = torch.nn.Parameter(state.pop("weight_scale"), requires_grad=False)
        layer.load_state_dict(state, strict=False)
    else:
        layer.load_state_dict(state)
    return layer, method


@pytest.mark.parametrize("granularity, scale_shape", [("channel", None), ("channel", (512, 1)), ("tensor", (1,))])
def test_prequantized_weights_load_and_match(granularity, scale_shape):
    reference = random_linear(256, 512)
    layer, method = prequantized_layer(Fp8Config(weight_granularity=granularity), reference, scale_shape)
    method.process_weights_after_loading(layer, "blocks.0.q")
    assert layer.weight_scale.shape == ((512,) if granularity == "channel" else ())
    assert layer.weight.is_contiguous() and layer.weight.t().stride() == (1, 256)  # column-major [K, N]
    x = outlier_input(10, 256, seed=21)
    out = method.apply(layer, x, reference.bias)
    assert rel_err(out, reference(x)) < 0.05


def test_static_activation_scale():
    reference = random_linear(256, 512)
    x = outlier_input(10, 256, seed=22)
    config = Fp8Config(weight_granularity="tensor", activation_scheme="static", activation_granularity="tensor")
    input_scale = (x.abs().max() / 448).reshape(())
    layer, _ = prequantized_layer(config, reference, input_scale=input_scale)
    method = Fp8LinearMethod(config, PerTensorScaledMMKernel.name)
    method.process_weights_after_loading(layer, "blocks.0.q")
    assert type(method.kernel_for(layer, torch.device("cpu"))) is PerTensorScaledMMKernel
    assert rel_err(method.apply(layer, x, reference.bias), reference(x)) < 0.1


def test_static_without_input_scale_learns_it_at_run_time():
    config = Fp8Config(activation_scheme="static", activation_granularity="tensor")
    layer, method = prequantized_layer(config, random_linear(64, 64), input_scale=torch.tensor(1.0))
    layer.input_scale = None
    method.process_weights_after_loading(layer, "blocks.3.k")
    assert layer.input_scale is None and config.learns_activation_scales


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -0.5])
def test_bad_weight_scale_names_layer(bad):
    layer, method = prequantized_layer(Fp8Config(), random_linear(64, 64))
    with torch.no_grad():
        layer.weight_scale[3] = bad
    with pytest.raises(ValueError, match="blocks.1.v.weight_scale"):
        method.process_weights_after_loading(layer, "blocks.1.v")


def test_scale_shape_that_fits_no_granularity():
    layer, method = prequantized_layer(Fp8Config(), random_linear(64, 64))
    layer.weight_scale = torch.nn.Parameter(torch.ones(32), requires_grad=False)
    with pytest.raises(ValueError, match="fits no granularity"):
        method.process_weights_after_loading(layer, "blocks.1.v")


def test_prequantized_method_rejects_high_precision_weight():
    layer = random_linear(64, 64)
    layer.weight_scale = torch.nn.Parameter(torch.ones(()), requires_grad=False)
    with pytest.raises(ValueError, match="expects an fp8 weight"):
        Fp8LinearMethod(Fp8Config()).process_weights_after_loading(layer, "x")


def test_online_method_rejects_bad_weights():
    method = Fp8OnlineLinearMethod(Fp8Config())
    layer = random_linear(64, 64)
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="lin: weight holds NaN"):
        method.process_weights_after_loading(layer, "lin")
    fp8_layer = random_linear(64, 64)
    fp8_layer.weight = torch.nn.Parameter(fp8_layer.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    with pytest.raises(ValueError, match="needs a bf16/fp16/fp32 weight"):
        method.process_weights_after_loading(fp8_layer, "lin")


def test_online_create_weights_then_load():
    reference = random_linear(128, 64)
    layer = Holder()
    method = Fp8OnlineLinearMethod(Fp8Config())
    method.create_weights(layer, 128, 64, params_dtype=torch.float16)
    layer.load_state_dict({"weight": reference.weight.detach().half()})
    method.process_weights_after_loading(layer, "lin")
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (64,)
    x = outlier_input(5, 128, seed=23)
    assert rel_err(method.apply(layer, x, reference.bias), reference(x)) < 0.05
