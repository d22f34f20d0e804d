import copy

import pytest
import torch
from helpers import outlier_input, rel_err
from torch import nn

from fp8_quant import Fp8Config, clone_module_tree, prepare_model_for_fp8
from fp8_quant.layer_state import is_fp8_layer


class CustomLinear(nn.Linear):
    """Stands for ComfyUI's ops.Linear and other subclasses: they must be patched too."""


class TinyBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = CustomLinear(3 * width, width)
        self.odd = nn.Linear(width, 40)
        self.back = nn.Linear(40, width)

    def forward(self, x):
        return x + self.back(self.odd(self.proj(torch.nn.functional.gelu(self.qkv(self.norm(x))))))


class TinyModel(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.embed = nn.Linear(16, width)
        self.blocks = nn.ModuleList([TinyBlock(width) for _ in range(2)])
        self.head = nn.Linear(width, 16)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def make_model(seed: int = 0) -> TinyModel:
    torch.manual_seed(seed)
    return TinyModel()


def state_bytes(model: nn.Module) -> dict[str, bytes]:
    return {
        key: value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        for key, value in model.state_dict().items()
    }


def test_quantizes_linears_and_skips_patterns():
    model = make_model()
    x = outlier_input(2, 9, 16, seed=31)
    reference = model(x)
    head_weight = model.head.weight
    report = prepare_model_for_fp8(model, Fp8Config(ignored_layers=("embed", "head")))
    names = {layer.name for layer in report.quantized}
    assert names == {f"blocks.{i}.{n}" for i in range(2) for n in ("qkv", "proj", "odd", "back")}
    assert model.blocks[0].proj.weight.dtype == torch.float8_e4m3fn  # subclass patched
    assert model.head.weight is head_weight and model.head.weight.dtype == torch.float32
    assert {layer.reason for layer in report.skipped} == {"matched 'embed'", "matched 'head'"}
    assert report.bytes_after < 0.3 * report.bytes_before + 2 * (16 * 64 * 4 + 64 * 4)
    out = model(x)
    assert out.shape == reference.shape and out.dtype == reference.dtype
    assert rel_err(out, reference) < 0.06
    assert "8/10 linears quantized" in report.summary()
    assert "dequant" in report.kernel_choice


def test_deep_copy_leaves_caller_model_untouched():
    model = make_model()
    before = state_bytes(model)
    quantized = copy.deepcopy(model)
    prepare_model_for_fp8(quantized, Fp8Config())
    assert state_bytes(model) == before
    x = outlier_input(4, 16, seed=32)
    assert rel_err(quantized(x), model(x)) < 0.06


def test_clone_module_tree_shares_nothing_that_changes():
    model = make_model()
    before = state_bytes(model)
    x = outlier_input(4, 16, seed=33)
    reference = model(x)
    clone = clone_module_tree(model)
    assert clone.blocks[0].qkv.weight.data_ptr() == model.blocks[0].qkv.weight.data_ptr()  # no memory copied
    report = prepare_model_for_fp8(clone, Fp8Config(), kernel="scaled_mm_rowwise")
    assert len(report.quantized) == 10
    assert state_bytes(model) == before
    assert torch.equal(model(x), reference)
    assert model.blocks[0].qkv.weight.dtype == torch.float32
    assert rel_err(clone(x), reference) < 0.06
    # A clone of a quantized model keeps working and shares its fp8 tensors.
    second = clone_module_tree(clone)
    assert torch.equal(second(x), clone(x))
    # Converting the original in place (as ComfyUI's offload does with .to) leaves the clone's tensors alone.
    expected = clone(x)
    model.to(torch.float64)
    assert clone.blocks[0].norm.weight.dtype == torch.float32
    assert torch.equal(clone(x), expected)


def test_model_without_linears_is_an_error():
    with pytest.raises(ValueError, match="Sequential has no nn.Linear"):
        prepare_model_for_fp8(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()), Fp8Config())


def test_progress_and_quantize_device():
    model = make_model()
    calls = []
    prepare_model_for_fp8(model, Fp8Config(), quantize_device="cpu", progress=lambda i, n, name: calls.append((i, n)))
    assert calls[-1] == (10, 10) and len(calls) == 10


def test_half_model_keeps_dtype():
    model = make_model().to(torch.bfloat16)
    x = outlier_input(3, 16, seed=34, dtype=torch.bfloat16)
    reference = model.float()(x.float())
    model = model.to(torch.bfloat16)
    prepare_model_for_fp8(model, Fp8Config(weight_granularity="tensor", activation_granularity="tensor"))
    out = model(x)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, reference) < 0.08


def test_plain_fp8_weights_are_used_at_unit_scale():
    """A model holding fp8-cast weights (ComfyUI's fp8 text encoders on a GPU): used as they are, in fp8."""
    torch.manual_seed(3)
    source = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32))
    with torch.no_grad():
        for layer in (source[0], source[2]):
            layer.weight.data = (layer.weight * 40).to(torch.float8_e4m3fn)
    x = outlier_input(4, 64, seed=8)

    def reference(inp: torch.Tensor) -> torch.Tensor:
        hidden = nn.functional.gelu(nn.functional.linear(inp, source[0].weight.float(), source[0].bias))
        return nn.functional.linear(hidden, source[2].weight.float(), source[2].bias)

    expected = reference(x)
    before = [layer.weight.clone() for layer in (source[0], source[2])]
    model = clone_module_tree(source)
    report = prepare_model_for_fp8(model, Fp8Config())
    assert len(report.quantized) == 2
    assert "2 fp8 weight used as it is (unit scale)" in report.summary()
    assert model[0].weight.dtype == torch.float8_e4m3fn and model[0].weight_scale.item() == 1.0
    with torch.no_grad():
        assert rel_err(model(x), expected) < 0.08  # only the activations are quantized
    for layer, weight in zip((source[0], source[2]), before, strict=True):
        assert torch.equal(layer.weight.view(torch.uint8), weight.view(torch.uint8))
        assert not is_fp8_layer(layer)


def test_a_built_model_with_nan_fp8_bytes_is_refused_naming_the_layer():
    """A plain fp8 cast held by a model the pack did not read (ComfyUI's fp8 text encoder): its bytes are checked."""
    model = nn.Sequential(nn.Linear(32, 16, bias=False))
    weight = (torch.randn(16, 32) * 10).to(torch.float8_e4m3fn).view(torch.uint8)
    weight[2, 5] = 0xFF
    model[0].weight = nn.Parameter(weight.view(torch.float8_e4m3fn), requires_grad=False)
    with pytest.raises(ValueError, match=r"^0: fp8 weight holds 1 NaN/inf"):
        prepare_model_for_fp8(model, Fp8Config())


def test_summary_bytes_are_against_bf16_and_name_the_kept_layers_dtype():
    """Two 512x512 linears, one kept: bf16 would hold 2 x 512 x 512 x 2 bytes = 1.0 MiB; the kept one stays in the
    fp32 it was built in (1.0 MiB alone), so the summary must say so rather than "bytes before -> after"."""
    model = nn.ModuleDict({"proj": nn.Linear(512, 512), "head": nn.Linear(512, 512)})
    report = prepare_model_for_fp8(model, Fp8Config(ignored_layers=["head"]))
    expected_after = 512 * 512 + 512 * 4 + 512 * 512 * 4  # fp8 weight + per-channel fp32 scales, fp32 kept layer
    assert report.bytes_after == expected_after
    expected = f"linear weights {expected_after / 2**20:.1f} MiB vs 1.0 MiB in bf16 (kept layers in fp32)"
    assert expected in report.summary()


def test_short_summary_is_plain_and_the_details_name_the_kept_layers():
    """The node's line has no quoted patterns nor the scheme's jargon; the kept layers and why are for the log."""
    model = nn.ModuleDict({"proj": nn.Linear(512, 512), "head": nn.Linear(512, 512)})
    report = prepare_model_for_fp8(model, Fp8Config(ignored_layers=["he*"]))
    short = report.short_summary()
    assert short.startswith("1 of 2 linears in fp8 (1 kept as they were") and "'" not in short, short
    assert "activations not rounded on this device" in short  # the CPU's dequantize kernel: nothing rounded
    assert report.kept_names() == "matched 'he*': head"


def test_cpu_summary_does_not_claim_calibration():
    """Under auto on the CPU the dequantize kernel keeps activations unrounded: nothing is calibrated, and the
    summary says so; an explicit scheme rounds them there as an FP8 GPU would, and the summary names it."""
    model = nn.ModuleDict({"proj": nn.Linear(64, 64)})
    auto = prepare_model_for_fp8(model, Fp8Config(activation_scheme="calibrated"))
    assert "calibrated" not in auto.summary() and "activations not rounded" in auto.summary(), auto.summary()
    explicit = Fp8Config(activation_scheme="dynamic", round_activations_on_dequant=True)
    rounded = prepare_model_for_fp8(nn.ModuleDict({"proj": nn.Linear(64, 64)}), explicit)
    assert "activations fp8 e4m3, per-token, dynamic" in rounded.summary(), rounded.summary()
