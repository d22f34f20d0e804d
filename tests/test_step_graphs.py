"""Step graphs on the CPU: when a step may be captured or replayed, when it gives up, and what the ComfyUI glue
refuses. The capture itself needs CUDA (tests/test_gpu_step_graphs.py); here ``_Graph.capture`` is a stand-in that
records the call and ``_why_eager`` is told the inputs are on a GPU, so the bookkeeping around it is what runs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fp8_quant import cuda_graphs, step_graphs
from fp8_quant.auto_scales import OBSERVING, STATIC
from fp8_quant.choices import CUDA_GRAPHS, CudaGraphs
from fp8_quant.layer_state import Fp8LayerState
from fp8_quant.step_graphs import MAX_CAPTURES_IN_A_ROW, StepGraphs
from nodes.step_graphs import foreign_work, transformer_options_of


class FakeGraph:
    """What ``_Graph`` gives: the capturing call's output, and replays that run the forward again (the real one
    replays its kernels on the inputs copied in)."""

    def __init__(self, forward, leaves, spec):
        self.forward, self.spec = forward, spec
        args, kwargs = torch.utils._pytree.tree_unflatten(leaves, spec)
        self.warmup_output = forward(*args, **kwargs)

    def replay(self, leaves):
        args, kwargs = torch.utils._pytree.tree_unflatten(leaves, self.spec)
        return self.forward(*args, **kwargs)


@pytest.fixture
def on_gpu(monkeypatch):
    """Graph bookkeeping as on a GPU: every call may capture (weights at one address), captures are stand-ins."""
    captured = []

    def capture(cls, forward, leaves, spec, device, pool):
        captured.append(spec)
        return FakeGraph(forward, leaves, spec)

    monkeypatch.setattr(cuda_graphs._Graph, "capture", classmethod(capture))
    monkeypatch.setattr(cuda_graphs.torch.cuda, "graph_pool_handle", lambda: object())

    def why_eager(self, device):
        not_ready = self.ready() if self.ready is not None else None
        return (self.gave_up or not_ready), (1,)

    monkeypatch.setattr(cuda_graphs.GraphedForward, "_why_eager", why_eager)
    monkeypatch.setattr(cuda_graphs.GraphedForward, "_weights", lambda self, device: ((1,), None))
    return captured


class Layer(nn.Linear):
    """A linear with an 8-bit layer state whose activation quantizer is in ``phase`` after ``calls`` calls."""

    def __init__(self, phase=OBSERVING, calls=1) -> None:
        super().__init__(4, 4)
        self.fp8 = Fp8LayerState(None, None, "layer", activation=SimpleNamespace(phase=phase, calls=calls))


def test_a_step_captures_once_then_replays_and_a_new_shape_gets_its_own_graph(on_gpu):
    model = nn.Sequential(nn.Linear(4, 4))
    graphs = StepGraphs(model)
    x, other = torch.randn(2, 4), torch.randn(3, 4)
    outputs = [graphs.run(model, (x,), {}) for _ in range(4)] + [graphs.run(model, (other,), {})]
    assert len(on_gpu) == 2 and graphs.graphed.replays == 2  # eager, captured x, replayed x twice, captured other
    assert all(torch.equal(out, model(x)) for out in outputs[:4])
    assert graphs.summary() == "CUDA graphs: 2 of 5 model calls replayed (2 captured)"  # the first call: eager


def test_no_capture_while_a_layer_calibrates_and_layers_that_never_ran_do_not_count(on_gpu):
    learning, unused = Layer(OBSERVING, calls=1), Layer(OBSERVING, calls=0)
    model = nn.Sequential(learning, unused)
    graphs = StepGraphs(model)
    x = torch.randn(2, 4)
    graphs.run(learning, (x,), {})  # the first call of a run is eager: it shows which layers run
    graphs.run(learning, (x,), {})
    assert not on_gpu and list(graphs.reasons.values()) == [1, 1]
    assert "1 layer(s) are still calibrating their activation scales" in graphs.reasons
    learning.fp8.activation.phase = STATIC  # decided (a later eager call polls it): the next step captures
    graphs.run(learning, (x,), {})
    graphs.run(learning, (x,), {})
    assert len(on_gpu) == 1 and graphs.graphed.replays == 1
    assert graphs.summary() == "CUDA graphs: 1 of 4 model calls replayed (1 captured)"  # calibration is not a fault


def test_inputs_that_change_every_call_give_up_until_the_run_ends(on_gpu):
    model = nn.Linear(4, 4)
    graphs = StepGraphs(model)
    x = torch.randn(2, 4)
    for step in range(MAX_CAPTURES_IN_A_ROW + 3):
        graphs.run(lambda x, step: model(x), (x, float(step)), {})  # a float that differs per call: a new key
    assert len(on_gpu) == MAX_CAPTURES_IN_A_ROW and not graphs.graphed.graphs  # gave up and let the graphs go
    assert "changed at each of 3 calls in a row" in graphs.summary()
    line = graphs.finish()
    assert graphs.last_run["captures"] == MAX_CAPTURES_IN_A_ROW and graphs.last_run["summary"] == line
    graphs.run(model, (x,), {})
    graphs.run(model, (x,), {})  # a new run tries again (after its first, eager call)
    assert len(on_gpu) == MAX_CAPTURES_IN_A_ROW + 1 and graphs.calls == 2


def test_new_weights_drop_the_old_graphs(on_gpu, monkeypatch):
    model = nn.Linear(4, 4)
    graphs = StepGraphs(model)
    x = torch.randn(2, 4)
    graphs.run(model, (x,), {})
    graphs.run(model, (x,), {})
    monkeypatch.setattr(cuda_graphs.GraphedForward, "_why_eager", lambda self, device: (None, (2,)))
    monkeypatch.setattr(cuda_graphs.GraphedForward, "_weights", lambda self, device: ((2,), None))
    graphs.run(model, (x,), {})  # the weights moved (a LoRA patch, an offload and reload): captured again
    assert len(on_gpu) == 2 and graphs.graphed.replays == 0


def test_refused_steps_run_eagerly_with_the_reason():
    model = nn.Linear(4, 4)
    graphs = StepGraphs(model)
    x = torch.randn(2, 4)
    assert torch.equal(graphs.run(model, (x,), {}, refused="model patches (x) run inside the model"), model(x))
    assert graphs.summary().endswith("eager where model patches (x) run inside the model")


def test_on_the_cpu_every_step_is_eager_and_says_why():
    model = nn.Linear(4, 4)
    graphs = StepGraphs(model)
    graphs.run(model, (torch.randn(2, 4),), {})
    assert graphs.graphed.reason == "the inputs are not on a CUDA device" and not graphs.graphed.graphs


def ours():
    return None


def pack_attention():
    return None


pack_attention.fp8_quant_attention = True
pack_attention.decides_per_step = False


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({}, None),
        ({"wrappers": {"diffusion_model": {"fp8_quant.step_graphs": [ours]}}, "patches": {}}, None),
        ({"wrappers": {"apply_model": {"x": [print]}}}, None),  # outside the diffusion model: no concern
        ({"wrappers": {"diffusion_model": {"teacache": [print]}}}, "another node's model wrapper (teacache)"),
        ({"patches": {"double_block": [print]}}, "model patches (double_block)"),
        ({"patches": {"double_block": []}}, None),
        ({"patches_replace": {"dit": {("double_block", 0): print}}}, "model patches replace (dit)"),
        ({"optimized_attention_override": print}, "another node's attention function"),
        ({"optimized_attention_override": pack_attention}, None),
        ({"prefetch_dynamic_vbars": True}, "dynamic VRAM"),
    ],
)
def test_what_runs_inside_the_model_keeps_steps_eager(options, reason):
    found = foreign_work(options, ours, "diffusion_model")
    assert (found is None) if reason is None else (reason in found), found


def test_8bit_attention_that_switches_per_step_keeps_steps_eager():
    def attention():
        return None

    attention.fp8_quant_attention, attention.decides_per_step = True, True
    assert "first and last steps" in foreign_work({"optimized_attention_override": attention}, ours, "diffusion_model")


def test_transformer_options_are_found_as_keyword_or_last_positional_dict():
    options = {"cond_or_uncond": [0, 1]}
    assert transformer_options_of((), {"transformer_options": options}) is options
    assert transformer_options_of((torch.ones(1), {"control": 1}, options), {}) is options
    assert transformer_options_of((torch.ones(1),), {}) == {}


def test_the_option_parses_once_with_a_one_line_error():
    assert CUDA_GRAPHS.parse("auto") is CudaGraphs.AUTO and CUDA_GRAPHS.parse("off") is CudaGraphs.OFF
    with pytest.raises(ValueError, match=r"cuda_graphs: 'always' is not allowed; allowed values: \['auto', 'off'\]"):
        CUDA_GRAPHS.parse("always")


class TwoBlocks(nn.Module):
    """A transformer-like model: its quantized layers in the children of a ``ModuleList``."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(Layer(STATIC)) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


@pytest.fixture
def whole_step_fails(on_gpu, monkeypatch):
    """As Wan's step in ComfyUI: its capture fails (a host-to-GPU copy inside); its blocks' captures do not."""
    fake = cuda_graphs._Graph.capture

    def capture(cls, forward, leaves, spec, device, pool):
        if isinstance(forward, TwoBlocks):
            raise RuntimeError("operation not permitted when stream is capturing")
        return fake.__func__(cls, forward, leaves, spec, device, pool)

    monkeypatch.setattr(cuda_graphs._Graph, "capture", classmethod(capture))
    return on_gpu


def test_a_step_that_cannot_be_captured_whole_replays_block_by_block(whole_step_fails):
    model = TwoBlocks()
    graphs = StepGraphs(model)
    x = torch.randn(2, 4)
    outputs = [graphs.run(model, (x,), {}) for _ in range(5)]  # eager, whole fails, blocks captured, 2 replayed
    assert all(torch.equal(out, model(x)) for out in outputs)
    assert len(whole_step_fails) == 2 and graphs.block_replays == 2
    assert all("forward" not in block.__dict__ for block in model.blocks)  # nothing left on the model between steps
    assert graphs.summary().startswith("CUDA graphs: 2 of 5 model calls replayed block by block (2 blocks;")
    graphs.finish()
    assert graphs.last_run["block_by_block"] and "not permitted" in graphs.last_run["failure"]


def test_block_graphs_that_would_hold_too_much_memory_are_not_made(whole_step_fails, monkeypatch):
    monkeypatch.setattr(step_graphs, "MAX_BLOCK_GRAPHS_BYTES", 3 * 2 * 2 * 4 * 4 // 2)  # under two blocks' inputs
    model = TwoBlocks()
    graphs = StepGraphs(model)
    x = torch.randn(2, 4)
    for _ in range(5):
        graphs.run(model, (x,), {})
    assert graphs.block_replays == 0 and not any(graphed.graphs for _, graphed in graphs.blocks)
    assert "more GPU memory than allowed" in graphs.summary()


def test_a_replaced_prepared_call_drops_the_graphs_that_read_its_tensors(monkeypatch):
    """A graph captured through a layer's prepared call reads the tensors it derived (a scale row, a cast bias);
    once that call is replaced they may be freed: the graphs go (the generation is part of what must not change)."""
    from fp8_quant import prepared

    model = nn.Linear(4, 4)
    graphed = cuda_graphs.GraphedForward(model, model)
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda", 0)))
    before, _ = graphed._weights(torch.device("cuda", 0))
    state = SimpleNamespace(prepared=object(), kernels={})
    prepared.prepare_call(nn.Linear(4, 4), state, torch.ones(1, 4), None)  # replaces (here: drops) one
    after, _ = graphed._weights(torch.device("cuda", 0))
    assert before[:-1] == after[:-1] and before != after and state.prepared is None


def test_blocks_with_large_inputs_run_eagerly(whole_step_fails, monkeypatch):
    """A block whose inputs pass ``MAX_BLOCK_INPUT_BYTES`` gets no graph (the GPU sets that step's pace)."""
    monkeypatch.setattr(step_graphs, "MAX_BLOCK_INPUT_BYTES", 2 * 4 * 4 - 1)  # one byte under a block's input
    model = TwoBlocks()
    graphs = StepGraphs(model)
    for _ in range(5):
        graphs.run(model, (torch.randn(2, 4),), {})
    assert graphs.block_replays == 0 and "inputs are large" in graphs.summary()
