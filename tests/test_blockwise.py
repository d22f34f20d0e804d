"""Block-wise scales on the CPU: weight blocks and groups against float32, fitted scales, the automatic choice for
weights with outlier input columns, and the argument layouts of the block-scaled ``_scaled_mm`` (checked on an
emulation of what torch documents, since the CPU has no block-scaled GEMM)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import outlier_input, random_linear, rel_err

from fp8_quant import Fp8Config, Fp8OnlineLinearMethod, QuantFP8
from fp8_quant.auto_scales import choose_weight_group
from fp8_quant.fp8_utils import dequantize, quantize_input_groups, quantize_weight
from fp8_quant.kernels import BlockScaledMMKernel, ChannelWiseScaledMMKernel, DequantLinearKernel, explain_choice
from fp8_quant.kernels.block_scaled_mm import activation_block_scale, weight_block_scale
from fp8_quant.scheme import (
    BLOCK_128,
    GROUP_128,
    MX_BLOCK,
    PER_CHANNEL,
    PER_TENSOR,
    PER_TOKEN,
    PER_TOKEN_GROUP_128,
    weight_group_of_scale,
    weight_scale_shape,
)

CPU = torch.device("cpu")


def outlier_column_weight(out_features=320, in_features=384, columns=4, factor=8.0, seed=0) -> torch.Tensor:
    """A weight whose rows span 100x and a few of whose input columns are ``factor`` times larger."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    weight *= torch.logspace(-1.5, 0.5, out_features)[:, None]
    weight[:, torch.randperm(in_features, generator=generator)[:columns]] *= factor
    return weight


def product_error(weight: torch.Tensor, group, fit: bool, seed: int = 1) -> float:
    """Relative error of ``x @ W.T`` with ``W`` quantized, on Gaussian inputs (the weight's error as it is used)."""
    x = torch.randn(128, weight.shape[1], generator=torch.Generator().manual_seed(seed))
    q, scale = quantize_weight(weight, group=group, fit=fit)
    return rel_err(x @ dequantize(q, scale, group=group).t(), x @ weight.t())


@pytest.mark.parametrize("group", [BLOCK_128, GROUP_128, MX_BLOCK, PER_CHANNEL])
@pytest.mark.parametrize("fit", [False, True])
def test_block_weights_match_float_reference(group, fit):
    weight = outlier_column_weight(out_features=200, in_features=300)  # ragged: partial blocks on both axes
    q, scale = quantize_weight(weight, group=group, fit=fit)
    assert scale.shape == weight_scale_shape(group, 200, 300)
    assert weight_group_of_scale(tuple(scale.shape), 200, 300) == group
    # e4m3 keeps 3 mantissa bits: about 2.5% per value; a misplaced block scale gives errors of order 1.
    assert rel_err(dequantize(q, scale, group=group), weight) < 0.04


def test_bound_catches_a_transposed_block_scale():
    weight = outlier_column_weight(out_features=256, in_features=384)
    q, scale = quantize_weight(weight, group=GROUP_128)
    wrong = scale.flip(0)  # the right shape, the wrong rows
    assert rel_err(dequantize(q, wrong, group=GROUP_128), weight) > 0.5


def test_fitted_scales_cut_the_error_of_outlier_columns():
    """Where a few large values carry each row, the scale decides whether they land on the fp8 grid: fitting it
    lowers the product's error clearly, and never raises any group's own squared error (amax is a candidate)."""
    weight = outlier_column_weight()
    for group in (PER_CHANNEL, GROUP_128):
        plain, fitted = product_error(weight, group, fit=False), product_error(weight, group, fit=True)
        assert fitted < 0.95 * plain, (group, plain, fitted)  # measured 0.91-0.92 over seeds
    q_plain, s_plain = quantize_weight(weight, group=GROUP_128)
    q_fit, s_fit = quantize_weight(weight, group=GROUP_128, fit=True)
    error_plain = (dequantize(q_plain, s_plain, group=GROUP_128) - weight).square()
    error_fit = (dequantize(q_fit, s_fit, group=GROUP_128) - weight).square()
    per_group = lambda e: e.view(320, 3, 128).sum(-1)  # noqa: E731
    assert bool((per_group(error_fit) <= per_group(error_plain) * (1 + 1e-6)).all())


def test_block_128_does_not_help_outlier_columns():
    """The measurement behind the automatic choice: 128x128 blocks hold hundreds of values each, so they are no
    more precise than one scale per tensor (e4m3's relative precision does not depend on the range)."""
    weight = outlier_column_weight()
    tensor, block = product_error(weight, PER_TENSOR, False), product_error(weight, BLOCK_128, False)
    assert block > 0.9 * tensor
    assert product_error(weight, GROUP_128, True) < 0.8 * block


def test_automatic_choice_fits_outlier_columns_in_groups_where_they_run_at_speed():
    weight = outlier_column_weight()
    choice = choose_weight_group(weight, groups_at_speed=True)
    assert choice.group == GROUP_128 and choice.fit and "input columns" in choice.reason
    choice = choose_weight_group(weight, groups_at_speed=False)
    assert choice.group == PER_CHANNEL and choice.fit
    plain = torch.randn(320, 384, generator=torch.Generator().manual_seed(3))
    assert choose_weight_group(plain, groups_at_speed=True)[::2] == (PER_TENSOR, False)
    narrow = outlier_column_weight(in_features=128)
    assert choose_weight_group(narrow, groups_at_speed=True).group == PER_CHANNEL  # one group is the row


def test_online_method_auto_on_cpu_takes_fitted_groups():
    layer = torch.nn.Linear(384, 320)
    with torch.no_grad():
        layer.weight.copy_(outlier_column_weight())
    reference = copy.deepcopy(layer)
    method = Fp8OnlineLinearMethod(Fp8Config(weight_granularity="auto"))
    method.process_weights_after_loading(layer, "blocks.0.ffn.0")
    assert layer.fp8.layer_config.weight_quant_key.group_shape == GROUP_128
    x = outlier_input(2, 9, 384, seed=4)
    assert rel_err(method.apply(layer, x, layer.bias), reference(x)) < 0.03


@pytest.mark.parametrize(
    "weight_granularity, activation_granularity",
    [("block", "token"), ("block", "group"), ("channel", "group"), ("block", "tensor")],
)
def test_block_layer_on_the_dequantize_kernel(weight_granularity, activation_granularity):
    config = Fp8Config(
        weight_granularity=weight_granularity,
        activation_granularity=activation_granularity,
        round_activations_on_dequant=True,
    )
    reference = random_linear(384, 256, seed=5)
    layer = copy.deepcopy(reference)
    method = Fp8OnlineLinearMethod(config)
    method.process_weights_after_loading(layer, "layer")
    kernel = method.kernel_for(layer, CPU)
    assert type(kernel) is DequantLinearKernel
    x = outlier_input(3, 17, 384, seed=6)
    out = method.apply(layer, x, layer.bias)
    expected = F.linear(x, reference.weight, reference.bias)
    # fp8 weights and activations (token, group or tensor scales): about 0.035 on these inputs; per tensor crushes
    # the quiet tokens of these outlier inputs more.
    assert rel_err(out, expected) < (0.3 if activation_granularity == "tensor" else 0.05)


def test_block_layer_kernel_choice_says_why_on_cpu():
    layer = torch.nn.Linear(384, 256)
    method = Fp8OnlineLinearMethod(Fp8Config(weight_granularity="block"))
    method.process_weights_after_loading(layer, "layer")
    kernel, why = explain_choice(layer.fp8.layer_config, CPU)
    assert kernel is DequantLinearKernel
    assert "cpu has no FP8 tensor cores" in why
    ok, reason = ChannelWiseScaledMMKernel.can_implement(layer.fp8.layer_config)
    assert not ok and reason == "block 128x128 weight scales need a block-scaled kernel"
    forced, why = explain_choice(layer.fp8.layer_config, CPU, BlockScaledMMKernel.name)
    assert forced is DequantLinearKernel and "forced scaled_mm_block" in why
    ok, reason = BlockScaledMMKernel.can_implement(
        Fp8OnlineLinearMethod(Fp8Config()).layer_config(layer.weight, torch.ones(256))
    )
    assert not ok and "per-channel weight scales are not 128-block scales" in reason


def test_group_activation_quantization_matches_float():
    x = outlier_input(5, 7, 300, seed=7)
    q, scale = QuantFP8(False, PER_TOKEN_GROUP_128)(x)
    assert scale.shape == (5, 7, 3)
    assert rel_err(dequantize(q, scale, group=PER_TOKEN_GROUP_128), x) < 0.04
    q_ref, s_ref = quantize_input_groups(x)
    assert torch.equal(scale, s_ref) and torch.equal(q.float(), q_ref.float())
    with pytest.raises(ValueError, match="static activation quantization is per-tensor"):
        QuantFP8(True, PER_TOKEN_GROUP_128)


def emulated_block_scaled_mm(a, b, scale_a, scale_b, out_dtype=torch.float32):
    """torch's block-scaled ``_scaled_mm`` as its checks and cuBLASLt's block scaling define it: ``a [M, K]``
    with 1x128 ``scale_a [M, K/128]`` (strides ``(1, M)``); ``b [K, N]`` column-major, and ``scale_b.t()`` either
    ``[N/128, K/128]`` row-major with a row stride padded to 4 (128x128) or ``[N, K/128]`` column-major (1x128)."""
    m, k = a.shape
    n = b.shape[1]
    kb = math.ceil(k / 128)
    assert scale_a.shape == (m, kb) and scale_a.stride() == (1, m)
    scale_bt = scale_b.t()
    if scale_bt.shape == (math.ceil(n / 128), kb):
        assert scale_bt.stride() == (-(-kb // 4) * 4, 1)
        per_column = scale_bt.repeat_interleave(128, dim=0)[:n]
    else:
        assert scale_bt.shape == (n, kb) and scale_bt.stride() == (1, n)
        per_column = scale_bt
    out = torch.zeros(m, n, dtype=torch.float64)
    for block in range(kb):
        cols = slice(block * 128, min(k, (block + 1) * 128))
        partial = a[:, cols].double() @ b[cols, :].double()
        out += partial * scale_a[:, block, None].double() * per_column[None, :, block].double()
    return out.to(out_dtype)


@pytest.mark.parametrize("group", [BLOCK_128, GROUP_128])
@pytest.mark.parametrize("activation_scale", ["tensor", "token", "group"])
def test_block_scaled_mm_arguments_have_the_layout_torch_checks(group, activation_scale):
    weight = outlier_column_weight(out_features=256, in_features=384)
    x = outlier_input(40, 384, seed=8)
    w_fp8, w_scale = quantize_weight(weight, group=group)
    if activation_scale == "group":
        x_fp8, x_scale = quantize_input_groups(x)
    else:
        x_fp8, x_scale = QuantFP8(False, PER_TENSOR if activation_scale == "tensor" else PER_TOKEN)(x)
    scale_a = activation_block_scale(x_scale, 40, 3)
    scale_b = weight_block_scale(w_scale, group)
    out = emulated_block_scaled_mm(x_fp8.float(), w_fp8.float().t(), scale_a, scale_b)
    bound = 0.3 if activation_scale == "tensor" else 0.05
    assert rel_err(out, x @ weight.t()) < bound
