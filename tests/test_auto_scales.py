"""Per-layer automatic scales: weight granularity at load, activation scales learnt while the model runs.

On the CPU the automatic kernel multiplies in high precision (nothing to learn), so these tests force the row-wise
``_scaled_mm`` kernel, which the CPU runs too; the learning is the same on a GPU.
"""

import logging

import pytest
import torch
from helpers import outlier_input, random_linear, rel_err

from fp8_quant import Fp8Config, Fp8OnlineLinearMethod
from fp8_quant.auto_scales import DYNAMIC, OBSERVING, STATIC, ScalePolicy, choose_weight_group, lower_decile
from fp8_quant.kernels import ChannelWiseScaledMMKernel, DequantLinearKernel
from fp8_quant.kernels.scaled_mm import cpu_rowwise_supported
from fp8_quant.scheme import PER_CHANNEL, PER_TENSOR

FORCED = ChannelWiseScaledMMKernel.name
pytestmark = pytest.mark.skipif(
    not cpu_rowwise_supported(), reason=f"the CPU _scaled_mm of torch {torch.__version__} has no row-wise scales"
)


def calibrated_layer(scheme="calibrated", kernel=FORCED, seed=1):
    reference = random_linear(256, 512, seed=seed)
    layer = random_linear(256, 512, seed=seed)
    granularity = "tensor" if scheme == "static" else "token"
    config = Fp8Config(activation_scheme=scheme, activation_granularity=granularity, weight_granularity="auto")
    method = Fp8OnlineLinearMethod(config, kernel)
    method.process_weights_after_loading(layer, "blocks.0.q")
    return reference, layer, method


def quiet_tokens(*shape, seed=0, scale=1.0):
    """Tokens of similar magnitude (no massive activations)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_weight_group_follows_the_rows_spread():
    even = torch.randn(64, 32)
    assert choose_weight_group(even)[0] == PER_TENSOR
    uneven = even * torch.logspace(-3, 0, 64)[:, None]
    group, reason, fit = choose_weight_group(uneven)
    assert group == PER_CHANNEL and "apart" in reason and not fit
    dead_row = even.clone()
    dead_row[5] = 0
    assert choose_weight_group(dead_row)[0] == PER_CHANNEL


def test_even_activations_become_static_per_tensor_with_a_margin():
    reference, layer, method = calibrated_layer()
    x = quiet_tokens(4, 33, 256, seed=2)
    for _ in range(method_policy_calls()):
        method.apply(layer, x, layer.bias)
    state = layer.fp8.activation
    assert state.phase == STATIC and "static" in state.reason
    # The static scale has a binade of headroom over the largest activation seen: 2 * amax / 448 (a literal, not the
    # policy's own margin, so that a changed margin fails here).
    torch.testing.assert_close(state.static_input_scale(), x.abs().max() * 2.0 / 448, rtol=1e-5, atol=0)
    out = method.apply(layer, x, layer.bias)
    assert rel_err(out, reference(x)) < 0.05
    assert type(method.kernel_for(layer, x.device)) is ChannelWiseScaledMMKernel


def method_policy_calls() -> int:
    return ScalePolicy().calls


def test_outlier_tokens_keep_dynamic_per_token_scales():
    reference, layer, method = calibrated_layer()
    x = outlier_input(4, 64, 256, seed=3)  # log-normal token magnitudes and x300 "massive" tokens
    for _ in range(method_policy_calls()):
        method.apply(layer, x, layer.bias)
    state = layer.fp8.activation
    assert state.phase == DYNAMIC and "outlier tokens" in state.reason
    assert rel_err(method.apply(layer, x, layer.bias), reference(x)) < 0.05


def test_forced_static_learns_even_with_outlier_tokens():
    _, layer, method = calibrated_layer(scheme="static")
    x = outlier_input(4, 64, 256, seed=4)
    for _ in range(method_policy_calls()):
        method.apply(layer, x, layer.bias)
    assert layer.fp8.activation.phase == STATIC


def test_static_scale_follows_activations_that_outgrow_it(caplog):
    reference, layer, method = calibrated_layer()
    x = quiet_tokens(64, 256, seed=5)
    for _ in range(method_policy_calls()):
        method.apply(layer, x, layer.bias)
    state = layer.fp8.activation
    assert state.phase == STATIC
    state.policy = ScalePolicy(check_every=1)
    big = x * 10  # five times past the static range (margin 2)
    with caplog.at_level(logging.INFO, logger="fp8_quant"):
        clamped = method.apply(layer, big, layer.bias)
        assert rel_err(clamped, reference(big)) > 0.3  # that call was clamped: the bound below can fail
        followed = method.apply(layer, big, layer.bias)
        method.apply(layer, big, layer.bias)
    assert rel_err(followed, reference(big)) < 0.05
    torch.testing.assert_close(state.history.reshape(()), big.abs().max(), rtol=1e-5, atol=0)
    assert any("past the static fp8 range" in record.getMessage() for record in caplog.records)


def test_one_summary_line_once_every_layer_decided(caplog):
    _, layer, method = calibrated_layer()
    _, other, _ = calibrated_layer(seed=2)
    x = quiet_tokens(8, 256, seed=6)
    with caplog.at_level(logging.INFO, logger="fp8_quant"):
        for _ in range(method_policy_calls()):
            method.apply(layer, x, layer.bias)
            method.apply(other, outlier_input(4, 64, 256, seed=7), other.bias)
    lines = [r.getMessage() for r in caplog.records if "after calibration" in r.getMessage()]
    assert lines == ["fp8 activation scales after calibration: 1 dynamic per-token (outlier tokens), "
                     "1 static per-tensor (calibrated)"]


def test_nothing_is_learnt_where_activations_stay_in_high_precision():
    _, layer, method = calibrated_layer(kernel=DequantLinearKernel.name)
    for _ in range(3):
        method.apply(layer, quiet_tokens(8, 256), layer.bias)
    assert layer.fp8.activation is None


def test_compiled_calls_never_change_phase(monkeypatch):
    """Inside torch.compile the host bookkeeping is skipped: an observing layer runs dynamic and stays observing."""
    _, layer, method = calibrated_layer()
    x = quiet_tokens(8, 256)
    method.apply(layer, x, layer.bias)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for _ in range(5):
        method.apply(layer, x, layer.bias)
    state = layer.fp8.activation
    assert state.phase == OBSERVING and state.calls == 1


@pytest.mark.parametrize("scheme", ["calibrated", "static"])
def test_torch_compile_runs_learnt_scales(scheme):
    reference, layer, method = calibrated_layer(scheme=scheme)
    x = quiet_tokens(8, 256, seed=8)
    for _ in range(method_policy_calls()):
        method.apply(layer, x, layer.bias)
    compiled = torch.compile(lambda inp: method.apply(layer, inp, layer.bias), backend="eager", fullgraph=True)
    assert rel_err(compiled(x), reference(x)) < 0.05


def test_first_call_compiled_in_one_graph_and_calibrated_by_the_model_hook():
    """Kernels and statistics made at load (prepare_kernels): a model compiled before it ever ran traces with no graph
    break, observes inside the graph, and the model-level hook (run outside the graph once per model call) decides
    the layers together; the graph then recompiles once onto the static path."""
    reference, layer, method = calibrated_layer()
    method.prepare_kernels(layer, "cpu")
    x = quiet_tokens(8, 256, seed=9)
    compiled = torch.compile(lambda inp: method.apply(layer, inp, layer.bias), backend="eager", fullgraph=True)
    state = layer.fp8.activation
    for _ in range(ScalePolicy().calls + 1):
        out = compiled(x)
        method.calibration.after_model_call()
    assert state.calls == 0 and state.phase == STATIC  # decided by the hook, not by per-call bookkeeping
    torch.testing.assert_close(state.history.reshape(()), x.abs().max())
    assert rel_err(out, reference(x)) < 0.05
    assert rel_err(compiled(x), reference(x)) < 0.05  # the static path, recompiled


def test_observing_compiles_with_dynamic_shapes():
    """A layer that sees several token counts while it observes (a DiT's linears: image tokens, then the text
    context) gets dynamic shapes from torch.compile; the observation must trace with a symbolic row count, and
    its spread statistic is the 10% quantile of the row scales as in eager. torch.quantile is kept out of the
    graph: torch 2.11 cannot trace it with a symbolic length (this torch may, so the graph is checked)."""
    _, layer, method = calibrated_layer()
    method.prepare_kernels(layer, "cpu")
    traced = []

    def backend(graph_module, example_inputs):
        traced.extend(node.target for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module

    compiled = torch.compile(
        lambda inp: method.apply(layer, inp, layer.bias), backend=backend, fullgraph=True, dynamic=True
    )
    state = layer.fp8.activation
    inputs = [quiet_tokens(rows, 256, seed=rows) for rows in (13, 40)]
    for x in inputs:
        compiled(x)
    assert traced and torch.quantile not in traced
    expected = max((x.abs().amax(dim=-1).max() / torch.quantile(x.abs().amax(dim=-1).float(), 0.1)).item()
                   for x in inputs)  # fmt: skip
    assert state.phase == OBSERVING
    torch.testing.assert_close(state.spread.reshape(()).item(), expected, rtol=1e-4, atol=0)


@pytest.mark.parametrize("count", [2, 3, 10, 11, 12, 21, 14040])
def test_lower_decile_is_torch_quantile(count):
    values = torch.rand(count, generator=torch.Generator().manual_seed(count)) * 10
    torch.testing.assert_close(lower_decile(values), torch.quantile(values, 0.1), rtol=1e-6, atol=1e-6)
