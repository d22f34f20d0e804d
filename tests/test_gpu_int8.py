"""The int8 kernel on a GPU with int8 tensor cores: ``torch._int_mm`` gives the dequantize kernel's numbers (the
same int8 values, an exact int32 product) for short and long calls and every output dtype, rotated or not."""

import pytest
import torch
from helpers import outlier_input, random_linear, rel_err

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
    fast, fallback = IntMMKernel(layer.fp8_layer_config, device), Int8DequantKernel(layer.fp8_layer_config, device)
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
