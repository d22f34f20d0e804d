"""GPU: the Triton GEMM on codes (``codes_gemm_triton``) that a prepared call takes between the one-launch linear's
rows and ``_scaled_mm``'s: the GEMM alone against a float computation of the same codes (row and one-value scales,
per-channel and per-tensor weight scales, odd shapes, every output dtype, fast and exact accumulation); whole
layers against the ``_scaled_mm`` path of the same layer and a float32 reference; past its work limit
``_scaled_mm`` runs; a CUDA-graph capture takes it for a warm input and ``_scaled_mm`` for a cold one."""

from __future__ import annotations

import pytest
import torch
from helpers import gpu_layer_pair, outlier_input, rel_err
from torch import nn

from fp8_quant import Fp8Config, clone_module_tree, supports_fp8_compute
from fp8_quant.auto_scales import DEFAULT_POLICY
from fp8_quant.kernels import scaled_mm
from fp8_quant.prepared import ColdLaunch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not supports_fp8_compute(), reason="needs a CUDA GPU with FP8 compute (capability 8.9+)"),
]

FP8 = torch.float8_e4m3fn
ON = 2**34  # the Triton GEMM's work limit for these tests (``scaled_mm.triton_gemm_work``; the default may be off)
CONFIGS = {
    "learnt, per-channel weight": Fp8Config(activation_scheme="calibrated", weight_granularity="channel"),
    "learnt, per-tensor weight": Fp8Config(activation_scheme="calibrated", weight_granularity="tensor"),
    "dynamic per token": Fp8Config(activation_scheme="dynamic", activation_granularity="token"),
}


@pytest.fixture
def gemm_calls(monkeypatch):
    """Counts the Triton GEMM's calls that ran (``calls``) and those it refused (``refused``: ``ColdLaunch``)."""
    from fp8_quant import codes_gemm_triton

    counted = {"calls": 0, "refused": 0}
    call = codes_gemm_triton.CodesGemm.__call__

    def counting(self, *args):
        try:
            out = call(self, *args)
        except ColdLaunch:
            counted["refused"] += 1
            raise
        counted["calls"] += 1
        return out

    monkeypatch.setattr(codes_gemm_triton.CodesGemm, "__call__", counting)
    return counted


def codes_problem(rows: int, cols: int, outs: int, row_scales: bool, per_channel: bool, seed: int):
    """Codes and weight as views of wider rows that are NaN past K (a load past K that is not masked shows)."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    codes = torch.full((rows, cols + 64), float("nan"), device="cuda").to(FP8)[:, :cols]
    codes.copy_((torch.randn(rows, cols, device="cuda", generator=generator) * 60).clamp(-448, 448).to(FP8))
    weight = torch.full((outs, cols + 64), float("nan"), device="cuda").to(FP8)[:, :cols]
    weight.copy_(torch.randn(outs, cols, device="cuda", generator=generator).to(FP8))
    weight_scale = torch.logspace(-2, 0, outs if per_channel else 1, device="cuda")
    scale_a = torch.rand(rows if row_scales else 1, 1, device="cuda", generator=generator) * 0.1 + 1e-3
    bias = torch.randn(outs, device="cuda", generator=generator)
    return codes, weight, weight_scale, scale_a, bias


@pytest.mark.parametrize("rows", [1, 17, 64, 129, 300])
@pytest.mark.parametrize("row_scales,per_channel", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("cols,bias", [(320, True), (512, False)])  # K a multiple of every tile's step, or of none
def test_the_gemm_gives_the_float_product_of_its_codes(rows, row_scales, per_channel, out_dtype, exact, cols, bias):
    from fp8_quant.codes_gemm_triton import CodesGemm

    outs = 200  # not a multiple of any column block
    codes, weight, weight_scale, scale_a, bias_values = codes_problem(rows, cols, outs, row_scales, per_channel, rows)
    bias_values = bias_values.to(out_dtype) if bias else None
    gemm = CodesGemm(weight_scale, bias_values, out_dtype, outs, cols, row_scales, exact, torch.device("cuda"))
    first = gemm(codes, scale_a, weight)  # Triton's own launch
    assert len(gemm.launches) == 1  # its launcher kept for this input
    second = gemm(codes, scale_a, weight)  # the compiled kernel's launcher, directly
    expected = (codes.double() @ weight.double().t()) * scale_a.double().reshape(-1, 1) * weight_scale.double()
    if bias:
        expected = expected + bias_values.double()
    for out in (first, second):
        assert out.dtype == out_dtype and out.shape == (rows, outs)
        assert rel_err(out, expected) < (1e-5 if out_dtype == torch.float32 and exact else 5e-3)
    assert torch.equal(first, second)
    # The same rows in rows of another stride: a new input key (the kernel reads rows by their stride).
    wider = torch.zeros(rows, cols + 32, device="cuda").to(FP8)[:, :cols]
    wider.copy_(codes)
    assert torch.equal(gemm(wider, scale_a, weight), first) and len(gemm.launches) == 2


def test_a_cold_input_inside_a_capture_is_refused_before_anything_runs():
    from fp8_quant.codes_gemm_triton import CodesGemm

    codes, weight, weight_scale, scale_a, _ = codes_problem(48, 256, 128, True, True, 0)
    gemm = CodesGemm(weight_scale, None, torch.bfloat16, 128, 256, True, False, torch.device("cuda"))
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ColdLaunch), torch.cuda.graph(graph):
        gemm(codes, scale_a, weight)
    assert not gemm.launches




def run(model: nn.Module, x: torch.Tensor, triton_gemm: bool) -> torch.Tensor:
    """The layer with the one launch off, and the Triton GEMM on (up to ``ON``) or off."""
    limits = scaled_mm.one_launch_work[0], scaled_mm.triton_gemm_work[0]
    scaled_mm.one_launch_work[0] = 0
    scaled_mm.triton_gemm_work[0] = ON if triton_gemm else 0
    try:
        with torch.inference_mode():
            return model(x)
    finally:
        scaled_mm.one_launch_work[0], scaled_mm.triton_gemm_work[0] = limits


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_layers_give_the_scaled_mm_numbers(name, dtype, bias, gemm_calls):
    reference, triton_layer, cublas_layer = gpu_layer_pair(CONFIGS[name], dtype, bias)
    warm = [outlier_input(64, 512, seed=seed).cuda().to(dtype) for seed in range(DEFAULT_POLICY.calls + 2)]
    for x in warm:  # the same calls on both: a learnt scale decides alike
        run(triton_layer, x, True)
        run(cublas_layer, x, False)
        torch.cuda.synchronize()
    before = gemm_calls["calls"]
    for rows in (1, 7, 64, 200, 700):
        x = outlier_input(rows, 512, seed=100 + rows).cuda().to(dtype)
        for _ in range(2):  # Triton's own launch, then the direct one
            expected, out = run(cublas_layer, x, False), run(triton_layer, x, True)
            assert out.dtype == expected.dtype == dtype
            assert rel_err(out.float(), expected.float()) < 4e-3, (rows, rel_err(out.float(), expected.float()))
            assert rel_err(out.float().cpu(), reference(x.float().cpu())) < 0.06
    assert gemm_calls["calls"] - before == 10 and gemm_calls["refused"] == 0  # every call took the Triton GEMM


def test_calls_past_the_limit_take_scaled_mm(gemm_calls):
    _, layer, _ = gpu_layer_pair(CONFIGS["dynamic per token"], torch.bfloat16, True)
    x = outlier_input(64, 512, seed=1).cuda().bfloat16()
    for _ in range(2):
        run(layer, x, True)
    calls = gemm_calls["calls"]
    assert calls > 0
    big = outlier_input(ON // (512 * 384) + 1, 512, seed=2).cuda().bfloat16()
    expected = run(clone_module_tree(layer), big, False)
    assert torch.equal(run(layer, big, True), expected)
    assert gemm_calls["calls"] == calls


def test_a_capture_replays_the_warm_gemm_and_falls_back_when_cold(gemm_calls):
    _, layer, _ = gpu_layer_pair(CONFIGS["dynamic per token"], torch.bfloat16, True)
    warm_x, cold_x = (outlier_input(rows, 512, seed=rows).cuda().bfloat16() for rows in (96, 112))
    expected_warm = [run(layer, warm_x, True).clone() for _ in range(3)][-1]
    expected_cold = run(clone_module_tree(layer), cold_x, False).clone()
    torch.cuda.synchronize()
    static_warm, static_cold = warm_x.clone(), cold_x.clone()
    graph = torch.cuda.CUDAGraph()
    calls = gemm_calls["calls"]
    limits = scaled_mm.one_launch_work[0], scaled_mm.triton_gemm_work[0]
    scaled_mm.one_launch_work[0], scaled_mm.triton_gemm_work[0] = 0, ON
    try:
        with torch.inference_mode(), torch.cuda.graph(graph):
            captured_warm = layer(static_warm)
            captured_cold = layer(static_cold)  # first sight of 112 rows: ``_scaled_mm`` inside the capture
    finally:
        scaled_mm.one_launch_work[0], scaled_mm.triton_gemm_work[0] = limits
    assert gemm_calls["calls"] == calls + 1 and gemm_calls["refused"] == 1  # the cold one refused before launching
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured_warm, expected_warm)
    assert rel_err(captured_cold.float(), expected_cold.float()) < 1e-6
