"""GPU: the text encoder's speed recipe (fp8 x fp8 on the tensor cores) replayed as CUDA graphs, against eager and
an fp32 reference (skipped without FP8 compute). CPU behaviour of the graph wrapper is tested too (it runs eagerly).
"""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err
from test_text_encoder import TinyEncoder, samples

from fp8_quant import clone_module_tree, quantize_text_encoder, supports_fp8_compute
from fp8_quant.cuda_graphs import graph_forward, ungraph_forward

gpu = pytest.mark.skipif(not supports_fp8_compute(), reason="needs a CUDA GPU with FP8 compute (capability 8.9+)")


def test_graph_wrapper_runs_eagerly_on_cpu_and_comes_off():
    model = TinyEncoder()
    x = samples(1)[0]["x"]
    expected = model(x)
    graphed = graph_forward(model)
    assert torch.equal(model(x), expected) and graphed.replays == 0
    copy = clone_module_tree(model)
    assert "forward" not in copy.__dict__  # a copy never replays the original's graphs
    ungraph_forward(model)
    assert "forward" not in model.__dict__


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_speed_recipe_graphs_match_eager_and_fp32(dtype):
    reference_model = TinyEncoder(width=256, depth=4)
    model = clone_module_tree(reference_model).to("cuda", dtype)
    calibration = [{"x": s["x"].to("cuda", dtype)} for s in samples(6, width=256)]
    report = quantize_text_encoder(model, calibration, recipe="speed", quantize_device="cuda")
    assert "scaled_mm" in report.kernel_choice, report.summary()
    inputs = [s["x"].to("cuda", dtype) for s in samples(3, tokens=40, width=256)]
    inputs.append(inputs[0][:17])  # another length: a graph of its own
    with torch.no_grad():
        for _ in range(2):  # the second pass runs every layer's prepared call, as the replays do
            eager = [model(x) for x in inputs]
        graphed = graph_forward(model)
        for _ in range(3):  # the first call of a length captures (and returns its warm-up's output), then replays
            outs = [model(x) for x in inputs]
    assert graphed.replays >= 8 and len(graphed.graphs) == 2
    for out, ref in zip(outs, eager):
        assert rel_err(out.float(), ref.float()) < 1e-3  # the same kernels, replayed
    with torch.no_grad():
        reference = [reference_model(x.float().cpu()) for x in inputs]
    assert max(rel_err(out.float().cpu(), ref) for out, ref in zip(outs, reference)) < 0.1


@pytest.mark.gpu
@gpu
def test_graphs_follow_new_weights():
    """A weight replaced (ComfyUI's LoRA patching, a move) gives new graphs, never a replay of old memory."""
    model = clone_module_tree(TinyEncoder(width=128)).cuda()
    quantize_text_encoder(model, [{"x": s["x"].cuda()} for s in samples(4, width=128)], recipe="speed")
    x = samples(1, width=128)[0]["x"].cuda()
    graphed = graph_forward(model)
    with torch.no_grad():
        before = [model(x) for _ in range(3)][-1]
        layer = model.blocks[0][0]
        layer.weight = torch.nn.Parameter(torch.zeros_like(layer.weight), requires_grad=False)
        after = [model(x) for _ in range(3)][-1]
        eager = graphed.forward(x)
    assert graphed.replays >= 4 and len(graphed.graphs) == 1  # the old weights' graph is gone
    assert rel_err(after.float(), eager.float()) < 1e-3
    assert rel_err(after.float(), before.float()) > 1e-2  # the new weight counts
