"""GPU: the one-launch fp8 linear (``fused_linear_triton``) that a prepared call takes at few rows, against the
two-launch path of the same layer (row quantizer, then ``torch._scaled_mm``) and a float32 reference: a learnt
activation scale (the default of a bf16 file) with per-channel and per-tensor weight scales, and dynamic per-token
scales, with and without a bias, in bf16, fp16 and fp32 (a file's fixed input scale is not covered here); the
learnt scale's buffers move as they do on the two-launch path; past the work limit the two-launch path runs."""

from __future__ import annotations

import pytest
import torch
from helpers import gpu_layer_pair, outlier_input, rel_err
from torch import nn

from fp8_quant import Fp8Config, supports_fp8_compute
from fp8_quant.auto_scales import DEFAULT_POLICY, STATIC
from fp8_quant.kernels import scaled_mm
from fp8_quant.layer_state import layer_state

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not supports_fp8_compute(), reason="needs a CUDA GPU with FP8 compute (capability 8.9+)"),
]

CONFIGS = {
    "learnt, per-channel weight": Fp8Config(activation_scheme="calibrated", weight_granularity="channel"),
    "learnt, per-tensor weight": Fp8Config(activation_scheme="calibrated", weight_granularity="tensor"),
    "dynamic per token": Fp8Config(activation_scheme="dynamic", activation_granularity="token"),
}


@pytest.fixture
def launches(monkeypatch):
    """Counts the one-launch calls."""
    from fp8_quant import fused_linear_triton

    counted = {"calls": 0}
    call = fused_linear_triton.FusedLinear.__call__

    def counting(self, *args):
        counted["calls"] += 1
        return call(self, *args)

    monkeypatch.setattr(fused_linear_triton.FusedLinear, "__call__", counting)
    return counted




def run(model: nn.Module, x: torch.Tensor, one_launch: bool) -> torch.Tensor:
    limit = scaled_mm.one_launch_work[0]
    scaled_mm.one_launch_work[0] = limit if one_launch else 0
    try:
        with torch.inference_mode():
            return model(x)
    finally:
        scaled_mm.one_launch_work[0] = limit


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_one_launch_gives_the_two_launch_numbers(name, dtype, bias, launches):
    reference, fused, two = gpu_layer_pair(CONFIGS[name], dtype, bias)
    warm = [outlier_input(64, 512, seed=seed).cuda().to(dtype) for seed in range(DEFAULT_POLICY.calls + 2)]
    for x in warm:  # the same calls on both: a learnt scale decides alike
        run(fused, x, True)
        run(two, x, False)
        torch.cuda.synchronize()
    before = launches["calls"]
    for rows in (1, 7, 64, 200):
        x = outlier_input(rows, 512, seed=100 + rows).cuda().to(dtype)
        for _ in range(2):  # Triton's own launch, then the direct one (rows = 1: an integer Triton makes constant)
            expected, out = run(two, x, False), run(fused, x, True)  # both learnt scales see the same calls
            assert out.dtype == expected.dtype == dtype
            assert rel_err(out.float(), expected.float()) < 4e-3, (rows, rel_err(out.float(), expected.float()))
            assert rel_err(out.float().cpu(), reference(x.float().cpu())) < 0.06
    assert launches["calls"] - before == 8  # every call above took the one launch


def test_learnt_scale_moves_alike_and_large_calls_take_two_launches(launches):
    _, fused, two = gpu_layer_pair(CONFIGS["learnt, per-channel weight"], torch.bfloat16, True)
    generator = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(DEFAULT_POLICY.calls + 4):  # even tokens: the learnt scale goes static
        x = torch.randn(32, 512, device="cuda", generator=generator).bfloat16()
        run(fused, x, True)
        run(two, x, False)
        torch.cuda.synchronize()
    spike = outlier_input(16, 512, seed=7).cuda().bfloat16() * 40  # past the learnt range: clamps, raises history
    run(fused, spike, True)
    run(two, spike, False)
    torch.cuda.synchronize()
    a, b = layer_state(fused[0]).activation, layer_state(two[0]).activation
    assert a.phase == b.phase == STATIC and launches["calls"] > 0
    for buffer in ("history", "scale", "overshoot"):
        assert torch.allclose(getattr(a, buffer), getattr(b, buffer), rtol=1e-6), buffer
    assert float(a.overshoot) > 1.0  # the spike was seen as clamped
    calls = launches["calls"]
    big = outlier_input(scaled_mm.one_launch_work[0] // (512 * 384) + 1, 512, seed=9).cuda().bfloat16()
    run(fused, big, True)
    assert launches["calls"] == calls
