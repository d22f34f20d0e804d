"""The host cost of one 8-bit linear call: the torch operations Python issues per call, pinned, and the prepared
call (``fp8_quant.prepared``) that keeps them few, checked against the general path and an fp32 reference.

At a few hundred tokens a GPU linear waits for the host; each torch call from Python (an attribute read of a
tensor, a view, an allocation, a launch) costs host time. The counts below are what the lean path issues on the
CPU with the CPU's ``_scaled_mm`` (the CPU is told it has fp8 GEMMs, so that layers get the GPU's kernels): the
eager quantizer stands in for the GPU's one fused launch. A change that adds operations to the path fails here.
"""

from __future__ import annotations

import pytest
import torch
from helpers import outlier_input, rel_err
from test_nodes_ops import StandInPlainOps
from torch import nn
from torch.overrides import TorchFunctionMode

import fp8_quant.kernels.scaled_mm as scaled_mm
from fp8_quant import Fp8Recipe, UserOptions
from fp8_quant.config import Fp8Config
from nodes.comfy_ops import LoadPlan, make_fp8_operations

K, N = 64, 48


class CountOps(TorchFunctionMode):
    """Every torch function and tensor method or attribute Python calls while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.ops.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.fixture(autouse=True)
def cpu_has_fp8_gemms(monkeypatch):
    if not scaled_mm.cpu_rowwise_supported():
        pytest.skip("this torch's CPU _scaled_mm takes per-tensor scales only")
    monkeypatch.setattr(scaled_mm, "fp8_compute_unsupported", lambda device: None)


def source_weight(per_tensor: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(N, K, generator=generator) / K**0.5
    if not per_tensor:  # rows two decades apart: per-channel scales
        weight = weight * torch.logspace(-1, 1, N)[:, None]
    return weight


def make_layer(weight: torch.Tensor, options: UserOptions, file_config=None, scale=None):
    plan = LoadPlan(Fp8Recipe.for_checkpoint(file_config, options))
    holder = nn.Module()
    holder.layer = make_fp8_operations(StandInPlainOps, plan).Linear(K, N, dtype=torch.bfloat16)
    bias = torch.linspace(-1, 1, N).to(torch.bfloat16)
    state = {"layer.weight": weight, "layer.bias": bias}
    if scale is not None:
        state["layer.weight_scale"] = scale
    holder.load_state_dict(state, strict=False)
    assert holder.layer.is_fp8()
    return holder.layer


def calibrated(layer, rows: int = 6):
    """A few calls past the observing phase on even tokens (a learnt scale becomes static; a dynamic layer stays
    dynamic); returns an input for the calls under test, with outlier channels."""
    generator = torch.Generator().manual_seed(4)
    for _ in range(4):
        layer(torch.randn(rows, K, generator=generator).to(torch.bfloat16))
    return outlier_input(rows, K, seed=9, factor=3.0).clamp(-20, 20).to(torch.bfloat16)


def ops_per_call(layer, x) -> list[str]:
    with CountOps() as counter:
        layer(x)
    return counter.ops


def reference(layer_weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x.float() @ layer_weight.float().t() + bias.float()


# The prepared call's checks (the weight's address; the scale's and the bias's address and inference flag or
# version; the input's dtype and device) and around the quantizer: the input's rank, the GEMM's view of the weight,
# the GEMM, the rank again. The rest is the eager quantizer (on a GPU: one allocation and one fused launch).
CHECKS = 9
AROUND = 4
EAGER_STATIC = 18  # the running quantizer: scale from the history, amax, overshoot, history, cast
EAGER_DYNAMIC = 9  # float, abs, amax, float, clamp(floor), div, div, clamp, to
ROW_SCALES = 6  # the one static scale repeated per row for the row-wise GEMM (a GPU launch writes them itself)
ROWS_CHECK = 3  # per-token scales are [M, 1] already: checked, not copied


@pytest.mark.parametrize(
    "name, per_tensor, options, expected",
    [
        ("static, per-tensor weight", True, UserOptions(weight_granularity="tensor"), CHECKS + AROUND + EAGER_STATIC),
        ("static, per-channel weight", False, UserOptions(), CHECKS + AROUND + EAGER_STATIC + ROW_SCALES),
        ("dynamic per-token", False, UserOptions(activation_scheme="dynamic"),
         CHECKS + AROUND + EAGER_DYNAMIC + ROWS_CHECK),
    ],
)
def test_a_calibrated_call_issues_a_pinned_number_of_torch_operations(name, per_tensor, options, expected):
    layer = make_layer(source_weight(per_tensor).to(torch.bfloat16), options)
    x = calibrated(layer)
    assert len(ops_per_call(layer, x)) == expected, (name, ops_per_call(layer, x))


def test_an_fp8_file_layer_issues_as_few_operations():
    from fp8_quant.fp8_utils import quantize_weight
    from fp8_quant.scheme import PER_CHANNEL

    stored, scale = quantize_weight(source_weight(False), group=PER_CHANNEL)
    layer = make_layer(stored, UserOptions(), Fp8Config(), scale)
    x = calibrated(layer)
    assert len(ops_per_call(layer, x)) == CHECKS + AROUND + EAGER_STATIC + ROW_SCALES


def test_the_general_path_costs_more_than_the_prepared_call():
    """What the prepared call saves (a guard that the count above is the prepared call's, not the general path's)."""
    layer = make_layer(source_weight(False).to(torch.bfloat16), UserOptions())
    x = calibrated(layer)
    prepared = len(ops_per_call(layer, x))
    layer.fp8.prepared = None
    general = len(ops_per_call(layer, x))  # the general path, which prepares the call again after it
    assert general > prepared + 10


def test_a_lora_set_weight_is_noticed_by_the_prepared_call():
    """``set_weight`` puts in a new weight parameter with its own scale: the next call must multiply with it."""
    weight = source_weight(False)
    layer = make_layer(weight.to(torch.bfloat16), UserOptions(activation_scheme="dynamic"))
    x = calibrated(layer)
    layer(x)
    assert layer.fp8.prepared is not None
    x = outlier_input(6, K, seed=10).to(torch.bfloat16)  # massive tokens too: per-token scales take them
    generator = torch.Generator().manual_seed(8)
    patched = weight + 6.0 * torch.randn(N, 4, generator=generator) @ torch.randn(4, K, generator=generator) / K
    layer.set_weight(patched.to(torch.bfloat16))
    out = layer(x)
    bias = layer.bias
    assert rel_err(out, reference(patched, bias, x)) < 0.05
    assert rel_err(out, reference(weight, bias, x)) > 0.2  # the old weight's output is far off: the bound can fail


def general_output(layer, x) -> torch.Tensor:
    """The general path's output, with the same learnt state (the prepared call is put back after)."""
    prepared = layer.fp8.prepared
    layer.fp8.prepared = None
    out = layer.fp8.method.apply_params(layer, layer.fp8_params(), x, layer.bias)
    layer.fp8.prepared = prepared
    return out


@pytest.mark.parametrize(
    "per_tensor, options",
    [(True, UserOptions(weight_granularity="tensor")), (False, UserOptions()),
     (False, UserOptions(activation_scheme="dynamic"))],
)  # fmt: skip
def test_the_prepared_call_gives_the_general_paths_output_bit_for_bit(per_tensor, options):
    layer = make_layer(source_weight(per_tensor).to(torch.bfloat16), options)
    x = calibrated(layer)
    layer(x)
    assert layer.fp8.prepared is not None
    for seed in (21, 22):
        x = outlier_input(3, 5, K, seed=seed, factor=3.0).to(torch.bfloat16) * 0.2
        layer(x)  # the learnt history takes this input's range in: both calls below then start from the same one
        prepared = layer(x)
        assert torch.equal(prepared, general_output(layer, x))


def changes():
    """Each change that must make the prepared call be rebuilt, and the one-line change of ``serve`` it catches."""

    def new_weight(layer):  # catches: the weight identity test removed
        layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)

    def scale_in_place(layer):  # catches: the scale's version left out of ``_identity``
        with torch.no_grad():
            layer.weight_scale.mul_(2.0)

    def new_bias(layer):  # catches: the bias identity test removed
        layer.bias = nn.Parameter(layer.bias.detach() + 1.0, requires_grad=False)

    def bias_in_place(layer):  # catches: the bias's version left out
        with torch.no_grad():
            layer.bias.add_(1.0)

    def swapped_kernel(layer):  # catches: the kernel identity test removed
        device = torch.device("cpu")
        layer.fp8.kernels[device] = type(layer.fp8.kernels[device])(layer.fp8.kernels[device].config, device)

    def moved_storage(layer):  # catches: the weight's address test removed (a move swaps the storage, as .to() does)
        layer.weight.data = layer.weight.data.clone()

    return [new_weight, scale_in_place, new_bias, bias_in_place, swapped_kernel, moved_storage]


@pytest.mark.parametrize("change", changes(), ids=lambda change: change.__name__)
def test_a_changed_layer_gets_a_new_prepared_call(change):
    layer = make_layer(source_weight(False).to(torch.bfloat16), UserOptions())
    x = calibrated(layer)
    layer(x)
    before = layer.fp8.prepared
    assert before is not None and before.serve(layer, layer.fp8, x, layer.bias) is not None
    change(layer)
    assert before.serve(layer, layer.fp8, x, layer.bias) is None
    out = layer(x)
    assert layer.fp8.prepared is not before
    assert torch.equal(out, general_output(layer, x))


def test_another_input_dtype_gets_a_new_prepared_call():  # catches: the input dtype test removed
    layer = make_layer(source_weight(False).to(torch.bfloat16), UserOptions())
    x = calibrated(layer)
    layer(x)
    before = layer.fp8.prepared
    x16 = x.to(torch.float16)
    assert before.serve(layer, layer.fp8, x16, layer.bias) is None
    out = layer(x16)
    assert out.dtype == torch.float16 and layer.fp8.prepared is not before


def test_another_device_is_not_served(monkeypatch):  # catches: the input device test removed
    layer = make_layer(source_weight(False).to(torch.bfloat16), UserOptions())
    x = calibrated(layer)
    layer(x)
    assert layer.fp8.prepared.serve(layer, layer.fp8, x.to("meta"), layer.bias) is None


def test_the_bench_runs_on_the_cpu(tmp_path):
    """``bench/bench_linear_host.py`` at tiny sizes (a smoke test: it runs and writes its JSON)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "host.json"
    subprocess.run([sys.executable, str(repo / "bench" / "bench_linear_host.py"), "--smoke", "--json", str(out)],
                   check=True, cwd=repo, capture_output=True, timeout=300)  # fmt: skip
    rows = json.loads(out.read_text())["results"]
    assert {row["path"] for row in rows} >= {"bf16 F.linear", "ours auto static", "ours dynamic per-token"}
    assert all(row["us_per_call"] > 0 for row in rows)
