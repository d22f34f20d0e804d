"""Rules of the core pinned by values worked out by hand, each one a test that a one-line change of the rule fails.

A mutation run of one-line changes of the core against the unit suite left these rules unchecked: every other test
either never reached them or computed its expectation with the constant under test. Here each expected value is a
literal derived in the test's docstring (or a second, independent computation), and each test goes through public
behaviour: what a function returns, what a quantized model computes, what a file loads as, what the CLI prints.
``tests/README.md`` lists each mutant and the test here that fails on it.
"""

from __future__ import annotations

import pytest
import torch
from checkpoints import source_weights, write_dialect
from helpers import outlier_input, rel_err
from safetensors.torch import load_file, save_file
from torch import nn

from fp8_quant import Fp8Config, UserOptions, prepare_model_for_fp8
from fp8_quant.__main__ import main
from fp8_quant.auto_scales import choose_weight_group
from fp8_quant.formats import load_checkpoint
from fp8_quant.fp8_utils import quantize_input_dynamic, quantize_weight
from fp8_quant.gptq import gptq_quantize
from fp8_quant.kernels import ChannelWiseScaledMMKernel
from fp8_quant.kernels.scaled_mm import cpu_rowwise_supported
from fp8_quant.scheme import PER_CHANNEL, PER_TENSOR
from fp8_quant.sensitivity import LayerSensitivity, choose_kept
from fp8_quant.text_encoder import quantize_text_encoder

needs_cpu_rowwise = pytest.mark.skipif(
    not cpu_rowwise_supported(), reason=f"the CPU _scaled_mm of torch {torch.__version__} has no row-wise scales"
)


class Mlp(nn.Module):
    """Two residual blocks of two linears (names no skip pattern matches)."""

    def __init__(self, width: int = 64, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width)) for _ in range(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


def _samples(count: int, tokens: int = 24, width: int = 64) -> list[dict]:
    return [{"x": outlier_input(tokens, width, seed=200 + i) / 20} for i in range(count)]


# --- the text encoder's activation granularity follows its scheme ------------------------------------------------


def test_text_encoder_static_activations_get_one_scale_per_tensor():
    """``activation_scheme=static`` with the granularity left on auto: a static scale is one calibrated scalar, so
    the recipe must pick per tensor (per token would be refused as an invalid config) and the model must run."""
    model = Mlp()
    x = outlier_input(16, 64, seed=3) / 20
    with torch.no_grad():
        reference = model(x)
    quantize_text_encoder(model, recipe="plain", options=UserOptions(activation_scheme="static"))
    with torch.no_grad():
        assert rel_err(model(x), reference) < 0.1


# --- the static activation range's headroom (margin 2) -----------------------------------------------------------


def _learnt_static_error(x: torch.Tensor, factor: float) -> float:
    """Output error of a layer that learnt its activation scale on ``x`` (four calls), then given ``factor * x``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256))
    reference = nn.Sequential(nn.Linear(256, 256))
    reference.load_state_dict(model.state_dict())
    config = Fp8Config(activation_scheme="calibrated", activation_granularity="token", weight_granularity="auto")
    prepare_model_for_fp8(model, config, kernel=ChannelWiseScaledMMKernel.name)
    with torch.no_grad():
        for _ in range(4):
            model(x)
        return rel_err(model(factor * x), reference(factor * x))


@needs_cpu_rowwise
def test_learnt_static_scale_has_one_binade_of_headroom():
    """A layer whose activations were learnt static per tensor on ``x`` takes later inputs up to twice as large
    unclamped (the scale is ``2 * amax / 448``: a binade of headroom) and clamps past that: inputs 1.9x the learnt
    amax keep the error of ``x`` itself; 4x are clamped to half their largest values (several times the error).
    With a margin of 1, 1.9x would be clamped too (about 2.6x the error)."""
    x = torch.randn(32, 256, generator=torch.Generator().manual_seed(1))  # even tokens: learnt static
    unclamped = _learnt_static_error(x, 1.0)
    assert unclamped < 0.05
    assert _learnt_static_error(x, 1.9) < 1.1 * unclamped
    assert _learnt_static_error(x, 4.0) > 2 * unclamped  # the bound above can fail: clamping shows


# --- error-compensating rounding: the text encoder's damping ----------------------------------------------------


def test_quality_recipe_rounds_with_a_tenth_of_the_mean_diagonal_as_damping():
    """The quality recipe damps each layer's input Hessian by 0.1 of its mean diagonal (few prompt tokens, wide
    layers: strong damping keeps the rounding from fitting the prompts). The first layer's inputs are the samples
    themselves, so its Hessian is computed here from them, and the weight the quantized layer multiplies with is
    read back by feeding it the identity: it must be the 0.1-damped rounding, not the 0.01-damped one."""
    model = Mlp()
    layer = model.blocks[0][0]
    weight = layer.weight.detach().clone()
    calibration = _samples(2, tokens=16)  # 32 tokens for 64 inputs: rank-deficient statistics
    inputs = torch.cat([sample["x"] for sample in calibration])
    hessian = inputs.t() @ inputs
    expected = {}
    for damp in (0.1, 0.01):
        codes, scale = gptq_quantize(weight, hessian, torch.int8, PER_CHANNEL, damp=damp)
        expected[damp] = codes.float() * scale[:, None]
    assert rel_err(expected[0.01], expected[0.1]) > 1e-3  # the two dampings round differently
    quantize_text_encoder(model, calibration, recipe="quality", budget=0.56, keep_dtype=None)
    with torch.no_grad():
        effective = (layer(torch.eye(64)) - layer.bias).t()
    assert rel_err(effective, expected[0.1]) < 1e-4
    assert rel_err(effective, expected[0.01]) > 1e-3


# --- which layers stay in bf16 ------------------------------------------------------------------------------------


def _ranked(budget: float, *layers: tuple[str, float, int]) -> list[str]:
    """The layers ``choose_kept`` keeps; each costs 1 byte a weight in fp8 (no scales, to keep the sums by hand)."""
    sensitivities = [LayerSensitivity(name, error, numel, fp8_bytes=numel) for name, error, numel in layers]
    choose_kept(sensitivities, budget)
    return [layer.name for layer in sensitivities if layer.kept]


def test_kept_layers_ranked_by_squared_error_per_weight():
    """Errors add in quadrature, so the layer to keep is the one with the most squared error per byte.

    a: error 0.2, 1000 weights -> 0.04 / 1000 = 4e-5;  b: error 0.05, 100 weights -> 0.0025 / 100 = 2.5e-5.
    (Error per weight would pick b: 2e-4 < 5e-4.) Total bf16 bytes 2200, fp8 1100; keeping a costs 1000 more,
    keeping b 100. Budget 0.96 -> 2112 bytes allowed: a fits (2100), then b does not (2200)."""
    assert _ranked(0.96, ("a", 0.2, 1000), ("b", 0.05, 100)) == ["a"]
    # c: 0.1, 100 -> 1e-4; d: 0.3, 1000 -> 9e-5 (the largest error alone would pick d, which fits alone too).
    # bf16 2200, fp8 1100, budget 0.96 -> 2112 allowed: c (+100) first, then d (+1000 -> 2200) does not fit.
    assert _ranked(0.96, ("c", 0.1, 100), ("d", 0.3, 1000)) == ["c"]
    # The most error per byte first, then the next while they fit: e (1e-4) and f (4e-5) but not g (1e-6).
    # bf16 2400, fp8 1200, budget 0.96 -> 2304 allowed: e (+100) and f (+1000) fit (2300), g (+100) then does not.
    assert _ranked(0.96, ("g", 0.01, 100), ("e", 0.1, 100), ("f", 0.2, 1000)) == ["e", "f"]


# --- the byte budget counts fp8 weights a model already holds at one byte each -----------------------------------


class HeldFp8Linear(nn.Linear):
    """A linear whose weight the model already holds in fp8 (per-row scale folded in by its own forward), as a
    scaled-fp8 text encoder's linears are."""

    def __init__(self, source: nn.Linear) -> None:
        super().__init__(source.in_features, source.out_features)
        codes, scale = quantize_weight(source.weight.detach(), torch.float8_e4m3fn, PER_CHANNEL)
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.register_buffer("row_scale", scale.reshape(-1, 1))
        self.bias = nn.Parameter(source.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.float() * self.row_scale, self.bias)


class MlpWithHeldFp8(Mlp):
    def __init__(self) -> None:
        super().__init__()
        self.tail = HeldFp8Linear(nn.Linear(64, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(super().forward(x))


def test_budget_counts_a_held_fp8_weight_at_one_byte_a_weight_and_its_row_scales():
    """Five 64x64 linears, the last already fp8: 4096 weights each, bf16 total 5 x 8192 = 40960 bytes. The four
    candidates become int8 weight-only: 4096 + 64 x 4 scale bytes = 4352 each; the held fp8 one costs the same
    (4096 + 4 x 64). All quantized: 5 x 4352 = 21760; each layer kept costs 8192 - 4352 = 3840 more.
    Budget 0.715 -> 29286.4 bytes allowed: one kept layer (25600) fits, a second (29440) does not. Counting the
    held layer at 2 bytes a weight (25600 before any is kept) keeps none; forgetting its scales (21504) keeps two."""
    model = MlpWithHeldFp8()
    report = quantize_text_encoder(model, _samples(4), recipe="quality", budget=0.715, keep_dtype=None)
    assert len(report.sensitivity.kept) == 1, report.sensitivity.table()


# --- per-tensor weight scales where the rows share a range -------------------------------------------------------


def _rows_apart(spread: float) -> torch.Tensor:
    """A weight whose largest row is ``spread`` times its quietest (columns all alike: no outlier columns)."""
    weight = torch.ones(64, 32)
    weight[0] *= spread
    return weight


def test_per_tensor_weight_scale_for_rows_within_seven_binades():
    """One scale per tensor while the rows lie within 128x (7 binades: e4m3's normal range is 15, so the quietest
    row's values stay normal); per channel past that."""
    assert choose_weight_group(_rows_apart(100.0)).group == PER_TENSOR
    assert choose_weight_group(_rows_apart(128.0)).group == PER_TENSOR
    assert choose_weight_group(_rows_apart(140.0)).group == PER_CHANNEL
    assert choose_weight_group(_rows_apart(1000.0)).group == PER_CHANNEL


# --- a tiny row keeps its precision (the amax floor is far below any real value) ---------------------------------


@pytest.mark.parametrize("power", [-20, -36])
def test_quantization_commutes_with_power_of_two_scaling_down_to_tiny_values(power):
    """Scaling by 2^power is exact in float32 and in the scales, so the fp8 codes of ``w * 2^power`` are those of
    ``w`` and its scale is ``w``'s times 2^power, as long as the amax floor (an all-zero row's guard) stays below
    these magnitudes (2^-36 * 10 is about 1.5e-10)."""
    factor = 2.0**power
    weight = outlier_input(48, 64, seed=5)
    for group in (PER_CHANNEL, PER_TENSOR):
        codes, scale = quantize_weight(weight, torch.float8_e4m3fn, group)
        tiny_codes, tiny_scale = quantize_weight(weight * factor, torch.float8_e4m3fn, group)
        assert torch.equal(tiny_codes.view(torch.uint8), codes.view(torch.uint8))
        assert torch.equal(tiny_scale, scale * factor)
    x = outlier_input(8, 64, seed=6)
    codes, scale = quantize_input_dynamic(x)
    tiny_codes, tiny_scale = quantize_input_dynamic(x * factor)
    assert torch.equal(tiny_codes.view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(tiny_scale, scale * factor)


# --- a high-precision weight's scale is multiplied in at load -----------------------------------------------------


@pytest.mark.parametrize("scale", [torch.tensor(2.0), torch.full((128,), 0.5)])
def test_a_bf16_weight_is_loaded_times_its_scale(tmp_path, scale):
    """ComfyUI multiplies a high-precision weight by its ``weight_scale``; the reader does it once at load. Powers
    of two keep the product exact in bf16, so the loaded weight is the stored one times 2 (or a half per row)."""
    path = write_dialect(tmp_path / "m.safetensors", "weight-scale", source_weights())
    tensors = load_file(str(path))
    stored = source_weights()["blocks.0.ffn.0.weight"].to(torch.bfloat16)  # 128 x 64
    tensors["blocks.0.ffn.0.weight"] = stored
    tensors["blocks.0.ffn.0.weight_scale"] = scale
    save_file(tensors, str(path))
    loaded = load_checkpoint(path).state_dict
    expected = stored * 2 if scale.numel() == 1 else stored / 2
    assert torch.equal(loaded["blocks.0.ffn.0.weight"], expected)
    assert "blocks.0.ffn.0.weight_scale" not in loaded


# --- ComfyUI's old scaled-fp8 files are recognised by their scale names too -------------------------------------


def test_comfy_scaled_file_without_its_marker_is_still_comfy_scaled(tmp_path, capsys):
    """Files saved by ComfyUI's older scaled-fp8 path carry ``scale_weight``/``scale_input``; some drop the
    ``scaled_fp8`` marker tensor. The names alone say comfy-scaled (what ``inspect`` and Load FP8 DiT's summary
    report), and the scales still load."""
    path = write_dialect(tmp_path / "names_only.safetensors", "comfy-scaled", source_weights(), static=True)
    tensors = load_file(str(path))
    del tensors["scaled_fp8"]
    save_file(tensors, str(path))
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "comfy-scaled" in out and "weight-scale" not in out, out
    loaded = load_checkpoint(path).state_dict
    torch.testing.assert_close(loaded["blocks.0.attn.q.weight_scale"], tensors["blocks.0.attn.q.scale_weight"])
    torch.testing.assert_close(loaded["blocks.0.attn.q.input_scale"], torch.tensor(0.02))
