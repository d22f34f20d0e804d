"""The int8 kernel on a GPU with int8 tensor cores: ``torch._int_mm`` gives the dequantize kernel's numbers (the
same int8 values, an exact int32 product) for short and long calls and every output dtype, rotated or not."""

import pytest
import torch
from helpers import grouped_int8_operands, grouped_int8_reference, outlier_input, random_linear, rel_err

from fp8_quant.config import Int8Config
from fp8_quant.kernels.int8_mm import Int8DequantKernel, IntMMKernel, int_mm_unsupported
from fp8_quant.methods_int8 import Int8OnlineLinearMethod
from fp8_quant.params import Fp8LinearParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or int_mm_unsupported("cuda", None) is not None,
        reason="needs a CUDA GPU with int8 tensor cores",
    ),
]


@pytest.mark.parametrize("group", [256, None])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int_mm_kernel_matches_the_dequantize_kernel_and_fp32(group, dtype):
    device = torch.device("cuda")
    reference = random_linear(1024, 512, seed=1).to(device)
    layer = random_linear(1024, 512, seed=1).to(device)
    Int8OnlineLinearMethod(Int8Config(rotation_group=group)).process_weights_after_loading(layer, "layer")
    assert layer.weight.dtype == torch.int8 and layer.weight.device.type == "cuda"
    fast, fallback = IntMMKernel(layer.fp8.layer_config, device), Int8DequantKernel(layer.fp8.layer_config, device)
    params = Fp8LinearParams.from_layer(layer)
    for rows in (1, 16, 17, 333, 4096):
        # fp16 holds at most 65504: these outlier inputs reach 2.6e5 at 4096 rows, so they are scaled into range.
        x = (outlier_input(rows, 1024, seed=rows) / (16 if dtype == torch.float16 else 1)).to(device, dtype)
        out = fast.apply(params, x, layer.bias)
        assert out.dtype == dtype and out.shape == (rows, 512)
        assert rel_err(out, fallback.apply(params, x, layer.bias)) < (1e-5 if dtype == torch.float32 else 4e-3)
        expected = reference(x.float()).detach()
        assert rel_err(out, expected) < (0.02 if group else 0.06)


def test_int8_layer_on_the_gpu_selects_int_mm():
    device = torch.device("cuda")
    layer = random_linear(512, 256).to(device)
    method = Int8OnlineLinearMethod(Int8Config())
    method.process_weights_after_loading(layer, "layer")
    assert type(method.kernel_for(layer, device)) is IntMMKernel
    assert "int_mm" in method.explain_kernel(layer, device)


@pytest.mark.parametrize("group", [256, 64, None])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_rotation_and_rounding_match_the_torch_operations(group, dtype):
    """The Triton kernel's codes and scales are those of ``quantize_int8_rows`` (float32 rotation in torch), up to
    a value on the other side of a .5 now and then (another summation order)."""
    from fp8_quant import int8_triton
    from fp8_quant.quant_int8 import quantize_int8_rows

    for rows, width in ((1, 1024), (17, 5120), (333, 1536), (4096, 5120)):
        x = (outlier_input(rows, width, seed=rows) / 16).to("cuda", dtype)
        assert int8_triton.supports_quantize(x, group)
        codes, scales = int8_triton.quantize_rows(x, group)
        expected_codes, expected_scales = quantize_int8_rows(x, group)
        assert codes.dtype == torch.int8 and scales.shape == (rows, 1)
        assert torch.allclose(scales, expected_scales, rtol=1e-6, atol=0)
        differ = codes.int() != expected_codes.int()
        assert (codes.int() - expected_codes.int()).abs().max() <= 1
        assert differ.float().mean() < 1e-3, differ.float().mean()


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_scales_and_bias_match_the_torch_operations(per_channel, with_bias):
    from fp8_quant import int8_triton

    generator = torch.Generator(device="cuda").manual_seed(3)
    acc = torch.randint(-(2**20), 2**20, (333, 520), device="cuda", dtype=torch.int32, generator=generator)
    rows = torch.rand(333, 1, device="cuda", generator=generator) * 1e-3
    columns = torch.rand(520, device="cuda", generator=generator) * 1e-2 if per_channel else torch.tensor(3e-3).cuda()
    bias = torch.randn(520, device="cuda", generator=generator).to(torch.bfloat16) if with_bias else None
    out = int8_triton.scale_bias(acc, rows, columns, bias, torch.bfloat16)
    expected = acc.float() * rows * (columns.view(1, -1) if per_channel else columns)
    if bias is not None:
        expected = expected + bias.float()
    assert out.dtype == torch.bfloat16
    # One bf16 step at most: the kernel may fuse the multiply and the bias add (one rounding fewer).
    torch.testing.assert_close(out.float(), expected.to(torch.bfloat16).float(), rtol=8e-3, atol=1e-6)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_triton_int8_gemm_gives_the_int_mm_numbers(per_channel, with_bias):
    """The Triton GEMM's exact int32 product, scaled in its epilogue, equals ``_int_mm`` then ``scale_bias`` (the
    same float32 operations on the same integers) for short, odd and long shapes and every output dtype."""
    from fp8_quant import int8_triton

    generator = torch.Generator(device="cuda").manual_seed(7)
    for rows, inner, cols in ((1, 256, 520), (17, 1536, 8960), (333, 5120, 1000), (4099, 13824, 5120), (64, 80, 24)):
        a = torch.randint(-127, 128, (rows, inner), device="cuda", dtype=torch.int8, generator=generator)
        w = torch.randint(-127, 128, (cols, inner), device="cuda", dtype=torch.int8, generator=generator)
        row_scale = torch.rand(rows, 1, device="cuda", generator=generator) * 1e-4
        column = torch.rand(cols, device="cuda", generator=generator) * 1e-3
        column = column if per_channel else torch.tensor(3e-4).cuda()
        bias = torch.randn(cols, device="cuda", generator=generator).to(torch.bfloat16) if with_bias else None
        assert int8_triton.supports_scaled_mm(a, w)
        exact = (a.double() @ w.double().t()) * row_scale.double() * column.double().reshape(1, -1)
        exact = exact + (bias.double() if with_bias else 0)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            out = int8_triton.scaled_int8_mm(a, w, row_scale, column, bias, dtype)
            padded = torch.nn.functional.pad(a, (0, 0, 0, max(0, 17 - rows)))
            product = torch._int_mm(padded, w.t())[:rows] if inner % 8 == 0 and cols % 8 == 0 else None
            assert out.dtype == dtype and out.shape == (rows, cols)
            if product is not None:
                expected = int8_triton.scale_bias(product, row_scale, column, bias, dtype)
                assert torch.equal(out, expected), (rows, inner, cols, dtype)
            assert rel_err(out.double(), exact) < (1e-6 if dtype == torch.float32 else 4e-3)


@pytest.mark.parametrize("group", [256, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_group_scaled_layer_on_the_gpu_matches_the_fallback_and_beats_row_scales(group, dtype):
    """One scale per row and group: the fused rotation/rounding and the grouped GEMM (short and long calls, tiles
    past the edges) give the dequantize kernel's numbers, and less error vs fp32 than one scale per row."""
    from fp8_quant import int8_triton

    device = torch.device("cuda")
    reference = random_linear(1536, 640, seed=5).to(device)
    errors = {}
    for granularity in ("token", "group"):
        layer = random_linear(1536, 640, seed=5).to(device)
        config = Int8Config(rotation_group=group, activation_granularity=granularity)
        Int8OnlineLinearMethod(config).process_weights_after_loading(layer, "layer")
        fast, fallback = IntMMKernel(layer.fp8.layer_config, device), Int8DequantKernel(layer.fp8.layer_config, device)
        params = Fp8LinearParams.from_layer(layer)
        total = 0.0
        for rows in (1, 17, 333, 4096):
            x = (outlier_input(rows, 1536, seed=rows) / 16).to(device, dtype)
            if granularity == "group":
                assert int8_triton.supports_grouped(x, group, group)
            out = fast.apply(params, x, layer.bias)
            assert out.dtype == dtype and out.shape == (rows, 640)
            assert rel_err(out, fallback.apply(params, x, layer.bias)) < 4e-3
            total += rel_err(out, reference(x.float()).detach())
        errors[granularity] = total
    assert errors["group"] < 0.9 * errors["token"], errors


def test_grouped_int8_gemm_matches_a_float64_group_sum():
    from fp8_quant import int8_triton

    generator = torch.Generator().manual_seed(9)
    for group, rows, inner, cols in ((256, 4096, 5120, 1536), (64, 33, 448, 200), (256, 1, 512, 128)):
        a, w, row, column = grouped_int8_operands(group, rows, inner, cols, generator)
        bias = torch.randn(cols, generator=generator)
        out = int8_triton.grouped_int8_mm(
            a.cuda(), w.cuda(), row.cuda().t(), column.cuda(), group, bias.cuda(), torch.float32
        ).cpu()
        expected = grouped_int8_reference(a, w, row, column, bias, group)
        assert rel_err(out, expected) < 1e-6, (group, rows, inner, cols)
