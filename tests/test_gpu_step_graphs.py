"""GPU: a model's steps through ``StepGraphs`` with layers that learn their activation scales (the default of a bf16
file), against the same model run eagerly and a float32 reference: eager while calibrating, one capture, replays
that match, another shape, new weights, outputs that a later replay does not overwrite. (KSampler's sampling with
the ComfyUI glue: tests/integration/test_comfyui.py::test_step_graphs_sample_as_eager_steps_do.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fp8_quant import Fp8Config, clone_module_tree, prepare_model_for_fp8, supports_fp8_compute
from fp8_quant.auto_scales import DEFAULT_POLICY
from fp8_quant.step_graphs import StepGraphs
from fp8_quant.testing import outlier_input, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not supports_fp8_compute(), reason="needs a CUDA GPU with FP8 compute (capability 8.9+)"),
]


class Blocks(nn.Module):
    """Residual MLP blocks: enough linears that a step is many launches."""

    def __init__(self, width: int = 256, depth: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + scale * block(x)
        return x


def quantized_pair(dtype=torch.bfloat16):
    torch.manual_seed(0)
    reference = Blocks()
    model = clone_module_tree(reference).to("cuda", dtype)
    prepare_model_for_fp8(model, Fp8Config(activation_scheme="calibrated", weight_granularity="channel"),
                          quantize_device="cuda")  # fmt: skip
    return reference, model


def test_steps_replay_after_calibration_and_match_eager_and_fp32():
    reference, model = quantized_pair()
    eager_model = clone_module_tree(model)  # the same weights, a calibration of its own
    graphs = StepGraphs(model)
    half = torch.tensor(0.5, device="cuda")
    inputs = [(outlier_input(64, 256, seed=seed).cuda().bfloat16(), half) for seed in range(3)]
    steps = DEFAULT_POLICY.calls + 6
    with torch.inference_mode():
        outs = [graphs.run(model, inputs[i % 3], {}) for i in range(steps)]
        eager = [eager_model(*inputs[i % 3]) for i in range(steps)]
    graphed = graphs.graphed
    assert graphed.captures == 1 and graphed.replays >= steps - DEFAULT_POLICY.calls - 3, graphs.summary()
    assert "calibrating" in next(iter(graphs.reasons))
    for out, ref in zip(outs, eager):
        assert rel_err(out.float(), ref.float()) < 2e-3  # the same kernels and scales, replayed
    fp32 = [reference(x.float().cpu(), s.cpu()) for x, s in inputs]
    assert max(rel_err(outs[i].float().cpu(), fp32[i % 3]) for i in range(steps - 3, steps)) < 0.05


def test_another_shape_new_weights_and_held_outputs():
    _, model = quantized_pair()
    graphs = StepGraphs(model)
    scale = torch.tensor(1.0, device="cuda")
    x, other = (outlier_input(n, 256, seed=n).cuda().bfloat16() for n in (64, 40))
    with torch.inference_mode():
        for _ in range(DEFAULT_POLICY.calls + 2):
            graphs.run(model, (x, scale), {})
        held = graphs.run(model, (x, scale), {})
        kept = held.clone()
        graphs.run(model, (other, scale), {})  # a graph of its own
        graphs.run(model, (other, scale), {})
        assert torch.equal(held, kept)  # a replay wrote into the graph's memory, not into what the caller holds
        assert len(graphs.graphed.graphs) == 2
        layer = model.blocks[0][0]
        layer.weight = nn.Parameter(torch.zeros_like(layer.weight), requires_grad=False)  # as a LoRA patch does
        patched = [graphs.run(model, (x, scale), {}) for _ in range(2)][-1]
        eager = model(x, scale)
    assert len(graphs.graphed.graphs) == 1  # the old weights' graphs are gone
    assert rel_err(patched.float(), eager.float()) < 2e-3 and rel_err(patched.float(), held.float()) > 1e-2
    line = graphs.finish()
    assert "replayed" in line and not graphs.graphed.graphs
