"""Writing a model as it runs (``save_quantized_model``) and the calibrated offline convert (``--calibrated``)."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoints import source_weights
from helpers import outlier_input, rel_err
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fp8_quant import Fp8Config, prepare_model_for_fp8
from fp8_quant.formats import CheckpointError, load_checkpoint, scan_checkpoint
from fp8_quant.formats.calibration import read_input_scales
from fp8_quant.formats.model_writer import learnt_input_scale, save_quantized_model
from fp8_quant.fp8_utils import dequantize
from fp8_quant.scheme import BLOCK_128, PER_CHANNEL, PER_TENSOR, weight_group_of_scale


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(256)
        self.q = nn.Linear(256, 256)
        self.ffn = nn.Linear(256, 384)
        self.out = nn.Linear(384, 256)
        self.head = nn.Linear(256, 16)

    def forward(self, x):
        h = self.ffn(self.q(self.norm(x)))
        return self.head(self.out(torch.nn.functional.gelu(h)))


def calibrated_model(granularities=("tensor", "channel", "block")) -> tuple[Block, Block]:
    """A small model whose linears use the given weight granularities (q, ffn, out), static activation scales
    learnt at run time on the CPU (the dequantize kernel rounds activations when asked), head kept."""
    torch.manual_seed(0)
    reference = Block()
    with torch.no_grad():
        reference.ffn.weight.mul_(torch.logspace(-2, 0, 384)[:, None])
        for param in reference.parameters():  # the values of a bf16 checkpoint, held in float32 (as on a CPU)
            param.copy_(param.to(torch.bfloat16).float())
        reference.out.bias.add_(1e-3)  # a value bf16 cannot hold: written as float32
    model = Block()
    model.load_state_dict(reference.state_dict())
    for name, granularity in zip(("q", "ffn", "out"), granularities):
        config = Fp8Config(
            weight_granularity=granularity,
            activation_scheme="static",
            activation_granularity="tensor",
            round_activations_on_dequant=True,
        )
        prepare_model_for_fp8(getattr(model, name), config)
    x = outlier_input(2, 17, 256, seed=3) / 20
    with torch.no_grad():
        for _ in range(3):
            model(x)
    return model, reference


def read(path):
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def test_weight_scale_format_is_the_model_exactly(tmp_path):
    model, _ = calibrated_model()
    report = save_quantized_model(model, tmp_path / "m.safetensors", "weight-scale", key_prefix="model.")
    assert report.fp8_layers == 3 and report.requantized == 0 and report.input_scales == 3
    saved = load_checkpoint(tmp_path / "m.safetensors").state_dict
    for name, group in (("q", PER_TENSOR), ("ffn", PER_CHANNEL), ("out", BLOCK_128)):
        layer = getattr(model, name)
        assert torch.equal(saved[f"model.{name}.weight"].float(), layer.weight.float())
        scale = saved[f"model.{name}.weight_scale"]
        assert weight_group_of_scale(tuple(scale.shape), *layer.weight.shape) == group
        assert torch.equal(scale.reshape(layer.weight_scale.shape), layer.weight_scale)
        state = layer.fp8.activation
        expected = state.history.max() * state.policy.margin / 448
        assert torch.allclose(saved[f"model.{name}.input_scale"], expected)
    raw = read(tmp_path / "m.safetensors")
    assert raw["model.head.weight"].dtype == raw["model.norm.weight"].dtype == torch.bfloat16  # kept: bf16, exact
    assert torch.equal(raw["model.head.weight"].float(), model.head.weight)
    assert raw["model.out.bias"].dtype == torch.float32 and torch.equal(raw["model.out.bias"], model.out.bias)


@pytest.mark.parametrize("output_format", ["comfy-quant", "comfy-scaled"])
def test_comfy_formats_hold_one_scale_per_tensor(tmp_path, output_format):
    model, reference = calibrated_model()
    path = tmp_path / "m.safetensors"
    report = save_quantized_model(model, path, output_format, key_prefix="model.diffusion_model.")
    assert report.requantized == 2 and "2 re-quantized per tensor" in report.summary()
    scan = scan_checkpoint(path)
    assert scan.dialect == output_format and {layer.granularity for layer in scan.fp8_layers} == {"tensor"}
    assert sum(layer.input_scale is not None for layer in scan.fp8_layers) == 3
    saved = load_checkpoint(path).state_dict
    for name in ("q", "ffn", "out"):
        layer = getattr(model, name)
        weight = saved[f"model.diffusion_model.{name}.weight"]
        saved_real = dequantize(weight, saved[f"model.diffusion_model.{name}.weight_scale"])
        group = layer.fp8.layer_config.weight_quant_key.group_shape
        running = dequantize(layer.weight, layer.weight_scale, group=group)
        if group.is_per_tensor():
            assert torch.equal(saved_real, running)  # written as it runs
        else:
            assert rel_err(saved_real, running) < 0.04  # one more fp8 rounding
            assert rel_err(saved_real, getattr(reference, name).weight) < 0.06


def test_layers_that_never_ran_have_no_input_scale_and_the_report_says_so(tmp_path):
    model = Block()
    prepare_model_for_fp8(model, Fp8Config(ignored_layers=("head",)))
    assert learnt_input_scale(model.q) is None
    report = save_quantized_model(model, tmp_path / "m.safetensors")
    assert report.input_scales == 0 and "3 without one: not run yet" in report.summary()
    with pytest.raises(ValueError, match="no 8-bit layers"):
        save_quantized_model(Block(), tmp_path / "n.safetensors")


def test_save_streams_one_layer_at_a_time(tmp_path, monkeypatch):
    """Nothing is read or re-quantized before the header is written, and each layer's tensors are made just before
    they are written."""
    import fp8_quant.formats.model_writer as model_writer

    model, _ = calibrated_model(("channel", "channel", "channel"))
    made: list[int] = []
    real_quantize = model_writer.quantize_weight
    monkeypatch.setattr(model_writer, "quantize_weight", lambda *a, **k: made.append(1) or real_quantize(*a, **k))
    real_write = model_writer.write_streaming

    def checking_write(destination, plan, metadata, progress, overwrite=True):
        assert not made, "layers were re-quantized before the header was written"
        real_write(destination, plan, metadata, progress, overwrite)

    monkeypatch.setattr(model_writer, "write_streaming", checking_write)
    save_quantized_model(model, tmp_path / "m.safetensors", "comfy-quant")
    assert len(made) == 3


def test_calibrated_convert_writes_the_learnt_input_scales(tmp_path, capsys):
    from fp8_quant.__main__ import main

    model, _ = calibrated_model()
    saved = tmp_path / "calibration.safetensors"
    save_quantized_model(model, saved, "comfy-quant", key_prefix="model.diffusion_model.")
    scales = read_input_scales(saved)
    assert set(scales) == {"q", "ffn", "out"}
    source = tmp_path / "bf16.safetensors"
    save_file(
        {f"model.diffusion_model.{k}": v.to(torch.bfloat16) for k, v in Block().state_dict().items()}, str(source)
    )
    out = tmp_path / "fp8.safetensors"
    assert main(["convert", str(source), str(out), "--format", "comfy-scaled", "--calibrated", str(saved)]) == 0
    assert "3 layers quantized, 3 with calibrated input scales" in capsys.readouterr().out
    written = read(out)
    for name, scale in scales.items():
        assert torch.equal(written[f"model.diffusion_model.{name}.scale_input"], scale)
    assert scan_checkpoint(out).dialect == "comfy-scaled"
    as_json = tmp_path / "scales.json"
    as_json.write_text(json.dumps({name: scale.item() for name, scale in scales.items()}))
    assert read_input_scales(as_json).keys() == scales.keys()


@pytest.mark.parametrize(
    "content, message",
    [("[1, 2]", "expected a JSON object"), ('{"q": 0}', "input scale of 'q' is 0.0"), ("{}", "holds no input scales")],
)
def test_bad_calibration_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "scales.json"
    path.write_text(content)
    with pytest.raises(CheckpointError, match=message) as error:
        read_input_scales(path)
    assert str(path) in str(error.value)


def test_calibration_file_without_input_scales(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in source_weights().items()}, str(path))
    with pytest.raises(CheckpointError, match="holds no input scales"):
        read_input_scales(path)


def test_int8_layers_are_written_as_comfyui_int8_tensorwise_exactly(tmp_path):
    """Rotated int8 layers (and one per tensor, not rotated) beside an fp8 one: comfy-quant holds each int8 layer as
    ComfyUI 0.30 writes ``int8_tensorwise`` (the int8 values that run, a float32 ``[N, 1]`` or ``[]`` scale, the
    rotation in its JSON entry), and the values turned back from the rotation are the original weight within int8
    rounding; the fp8-only formats refuse with the option and the layer named."""
    from fp8_quant.config import Int8Config
    from fp8_quant.quant_int8 import dequantize_int8_weight

    torch.manual_seed(0)
    model = Block()
    original = {name: getattr(model, name).weight.detach().clone() for name in ("q", "ffn", "out")}
    prepare_model_for_fp8(model.q, Int8Config(rotation_group=64))
    prepare_model_for_fp8(model.ffn, Int8Config(rotation_group=None, weight_granularity="tensor"))
    prepare_model_for_fp8(model.out, Fp8Config())
    path = tmp_path / "int8.safetensors"
    report = save_quantized_model(model, path, "comfy-quant", key_prefix="model.diffusion_model.")
    assert report.int8_layers == 2 and report.fp8_layers == 1, report
    assert "2 int8 layers as ComfyUI's int8_tensorwise (1 rotated in groups of 64)" in report.summary()
    stored = read(path)
    prefix = "model.diffusion_model."
    entries = {name: json.loads(bytes(stored[f"{prefix}{name}.comfy_quant"].tolist())) for name in ("q", "ffn", "out")}
    assert entries["q"] == {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 64}, entries
    assert entries["ffn"] == {"format": "int8_tensorwise"}, entries
    assert entries["out"]["format"] == "float8_e4m3fn", entries
    assert torch.equal(stored[f"{prefix}q.weight"], model.q.weight) and stored[f"{prefix}q.weight"].dtype == torch.int8
    assert stored[f"{prefix}q.weight_scale"].shape == (256, 1) and stored[f"{prefix}ffn.weight_scale"].shape == ()
    assert not any(key.startswith(f"{prefix}q.input") for key in stored)
    for name, group in (("q", 64), ("ffn", None)):
        real = dequantize_int8_weight(stored[f"{prefix}{name}.weight"], stored[f"{prefix}{name}.weight_scale"], group)
        assert rel_err(real, original[name]) < (0.01 if name == "q" else 0.03), name
    for fmt in ("comfy-scaled", "weight-scale"):
        with pytest.raises(ValueError, match=r"format: q is an int8 layer"):
            save_quantized_model(model, tmp_path / f"{fmt}.safetensors", fmt)
        assert not (tmp_path / f"{fmt}.safetensors").exists()


def test_group_scaled_int8_layers_are_rounded_again_per_channel_for_comfyui(tmp_path):
    """int8_tensorwise holds one scale per channel: a layer with one per group is written with its rotated values
    rounded again per channel (the summary says how many), close to the values that ran, and exact int8 per
    channel (each row's largest code is 127)."""
    from fp8_quant.config import Int8Config
    from fp8_quant.quant_int8 import dequantize_int8_weight

    torch.manual_seed(1)
    model = Block()
    prepare_model_for_fp8(model.q, Int8Config(rotation_group=64, activation_granularity="group"))
    assert model.q.weight_scale.dim() == 2
    ran = dequantize_int8_weight(model.q.weight, model.q.weight_scale, 64)
    path = tmp_path / "grouped.safetensors"
    report = save_quantized_model(model, path, "comfy-quant", key_prefix="")
    assert report.int8_regrouped == 1
    assert "1 int8 layers with one scale per group re-rounded to one per channel" in report.summary()
    stored = read(path)
    weight, scale = stored["q.weight"], stored["q.weight_scale"]
    assert weight.dtype == torch.int8 and scale.shape == (model.q.weight.shape[0], 1)
    assert weight.abs().amax(dim=1).eq(127).all()
    written = dequantize_int8_weight(weight, scale.reshape(-1), 64)
    assert 0 < rel_err(written, ran) < 0.01
