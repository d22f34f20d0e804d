"""GPU: the row quantizer's shared output buffers (``quant_triton.RowQuantizer`` with ``scratch``), which the
prepared ``_scaled_mm`` product takes at few rows: layers that share them give, call after call and size after
size, exactly what they give with outputs of their own; a CUDA-graph capture keeps its own outputs, so an eager call
between replays changes nothing in the graph's result."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fp8_quant import Fp8Config, prepare_model_for_fp8, supports_fp8_compute
from fp8_quant.kernels import scaled_mm
from fp8_quant.testing import outlier_input

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not supports_fp8_compute(), reason="needs a CUDA GPU with FP8 compute (capability 8.9+)"),
]

CONFIGS = {
    "dynamic per token": Fp8Config(activation_scheme="dynamic", activation_granularity="token"),
    "learnt": Fp8Config(activation_scheme="calibrated", weight_granularity="channel"),
}


def models(config: Fp8Config) -> list[nn.Module]:
    """Two layers of one width (they share the buffers of each size), on the GPU in bf16."""
    built = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(512, 384)).to("cuda", torch.bfloat16)
        prepare_model_for_fp8(model, config, quantize_device="cuda")
        built.append(model)
    return built


def calls(pair: list[nn.Module]) -> list[torch.Tensor]:
    """An interleaved run of both layers at several sizes, two launches each (the one launch off)."""
    limit = scaled_mm.one_launch_work[0]
    scaled_mm.one_launch_work[0] = 0
    outs = []
    try:
        with torch.inference_mode():
            for step, rows in enumerate((64, 64, 7, 64, 200, 7, 1, 64)):
                x = outlier_input(rows, 512, seed=step).cuda().bfloat16()
                outs += [pair[0](x), pair[1](x * 0.5)]
    finally:
        scaled_mm.one_launch_work[0] = limit
    torch.cuda.synchronize()
    return outs


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_layers_sharing_the_buffers_give_their_own_numbers(name, monkeypatch):
    from fp8_quant import quant_triton

    monkeypatch.setattr(quant_triton, "_scratch", {})
    shared = calls(models(CONFIGS[name]))
    assert quant_triton._scratch, "the prepared product did not take the shared buffers"
    monkeypatch.setattr(quant_triton, "SCRATCH_BYTES", 0)  # quantizers made from here on allocate per call
    monkeypatch.setattr(quant_triton, "_scratch", {})
    own = calls(models(CONFIGS[name]))
    assert not quant_triton._scratch
    for index, (a, b) in enumerate(zip(shared, own)):
        assert torch.equal(a, b), index


def test_a_capture_keeps_its_own_outputs(monkeypatch):
    from fp8_quant import quant_triton

    monkeypatch.setattr(quant_triton, "_scratch", {})
    layer, other = models(CONFIGS["dynamic per token"])
    x = outlier_input(64, 512, seed=3).cuda().bfloat16()
    limit = scaled_mm.one_launch_work[0]
    scaled_mm.one_launch_work[0] = 0
    try:
        with torch.inference_mode():
            for _ in range(3):  # the prepared call is made and launched eagerly first
                expected = layer(x).clone()
            torch.cuda.synchronize()
            eager_entries = set(quant_triton._scratch)
            static_x = x.clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = layer(static_x)
            assert set(quant_triton._scratch) == eager_entries  # nothing new while capturing
            for _ in range(3):
                other(x * 3)  # writes the shared buffers of this size
            graph.replay()
            torch.cuda.synchronize()
    finally:
        scaled_mm.one_launch_work[0] = limit
    assert torch.equal(captured, expected)
