"""ComfyUI 0.30's ``int8_tensorwise`` files (per-tensor and per-channel scales, with and without ConvRot) read into
int8 layers: the reader's canonical form, the recipe's decision, the layer's output against float32, and the
one-line errors for files ComfyUI could not run either. The files are written here by an independent reading of
ComfyUI's convention (explicit Hadamard matrix, float64 rounding), not by the pack's own quantizer."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import explicit_hadamard, outlier_input, rel_err
from safetensors.torch import save_file

from fp8_quant import Fp8Recipe, UserOptions
from fp8_quant.dispatch import STORED_INT8, STORED_INT8_ROTATED
from fp8_quant.formats import CheckpointError, load_checkpoint
from fp8_quant.formats.inspect import inspect_checkpoint

PREFIX = "model.diffusion_model."
SHAPES = {"blocks.0.attn.q": (64, 256), "blocks.0.ffn.0": (128, 512)}


def source(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (rows, cols) in SHAPES.items():
        weight = torch.randn(rows, cols, generator=generator) / cols**0.5
        weight *= torch.logspace(-1.5, 0.5, rows)[:, None]
        weight[:, torch.randperm(cols, generator=generator)[:4]] *= 8  # outlier input columns
        tensors[f"{name}.weight"] = weight
        tensors[f"{name}.bias"] = torch.randn(rows, generator=generator) * 0.02
    tensors["head.weight"] = torch.randn(16, 128, generator=generator)
    return tensors


def comfy_int8(weight: torch.Tensor, per_channel: bool, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's convention read independently: W @ H per group, amax / 127, round half to even; scale [N, 1]."""
    values = weight.double()
    if group:
        values = (values.reshape(values.shape[0], -1, group) @ explicit_hadamard(group)).reshape(values.shape)
    scale = values.abs().amax(dim=1, keepdim=True) / 127 if per_channel else values.abs().amax() / 127
    return torch.round(values / scale).clamp(-128, 127).to(torch.int8), scale.float()


def write_int8(path, per_channel=True, group=256, where="top", in_metadata=False, entry_extra=None):
    tensors, layers = {}, {}
    for key, value in source().items():
        layer = key.removesuffix(".weight")
        if layer in SHAPES and key.endswith(".weight"):
            weight, scale = comfy_int8(value, per_channel, group)
            tensors[PREFIX + key], tensors[f"{PREFIX}{layer}.weight_scale"] = weight, scale
            entry = {"format": "int8_tensorwise"}
            rotation = {"convrot": True, "convrot_groupsize": group} if group else {}
            entry.update(rotation if where == "top" else {"params": rotation})
            entry.update(entry_extra or {})
            layers[layer] = entry
        else:
            tensors[PREFIX + key] = value.to(torch.bfloat16)
    metadata = None
    if in_metadata:
        metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    else:
        for layer, entry in layers.items():
            tensors[f"{PREFIX}{layer}.comfy_quant"] = torch.tensor(list(json.dumps(entry).encode()), dtype=torch.uint8)
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_layer(checkpoint, name: str, options: UserOptions | None = None):
    recipe = Fp8Recipe.for_checkpoint(
        checkpoint.config, options or UserOptions(), int8_layers=checkpoint.int8_layers
    )
    state = checkpoint.state_dict
    rows, cols = SHAPES[name]
    layer = torch.nn.Linear(cols, rows)
    weight = state[f"{PREFIX}{name}.weight"]
    decision = recipe.decide(name, weight)
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    layer.weight_scale = torch.nn.Parameter(state[f"{PREFIX}{name}.weight_scale"], requires_grad=False)
    layer.bias = torch.nn.Parameter(state[f"{PREFIX}{name}.bias"].float(), requires_grad=False)
    decision.method.process_weights_after_loading(layer, name)
    return layer, decision, recipe


@pytest.mark.parametrize(("per_channel", "group", "where", "in_metadata"), [
    (True, 256, "top", False),
    (True, 256, "params", True),
    (True, 64, "top", False),
    (False, 256, "top", True),
    (True, None, "top", False),
    (False, None, "top", False),
])  # fmt: skip
def test_comfyui_int8_file_reads_into_int8_layers_close_to_float32(tmp_path, per_channel, group, where, in_metadata):
    path = write_int8(tmp_path / "i8.safetensors", per_channel, group, where, in_metadata)
    checkpoint = load_checkpoint(path)
    assert checkpoint.int8_layers == dict.fromkeys(SHAPES, group)
    scale = checkpoint.state_dict[f"{PREFIX}blocks.0.ffn.0.weight_scale"]
    assert scale.dtype == torch.float32 and scale.shape == ((128,) if per_channel else ())
    assert checkpoint.state_dict[f"{PREFIX}blocks.0.ffn.0.weight"].dtype == torch.int8
    assert f"{PREFIX}blocks.0.ffn.0.comfy_quant" not in checkpoint.state_dict
    layer, decision, recipe = load_layer(checkpoint, "blocks.0.ffn.0")
    assert decision.reason == (STORED_INT8_ROTATED if group else STORED_INT8)
    assert recipe.online is None  # a quantized file: its bf16 layers stay as they are
    assert layer.fp8.layer_config.rotation_group == group
    reference = source()["blocks.0.ffn.0.weight"]
    x = outlier_input(24, 512, seed=2)
    expected = x @ reference.T + checkpoint.state_dict[f"{PREFIX}blocks.0.ffn.0.bias"].float()
    error = rel_err(layer.fp8.method.apply(layer, x, layer.bias), expected)
    bounds = {(True, True): 0.012, (False, True): 0.03, (True, False): 0.03, (False, False): 0.12}
    assert error < bounds[(per_channel, group is not None)], error


def test_rotated_file_is_more_accurate_than_the_unrotated_one(tmp_path):
    x = outlier_input(48, 512, seed=3)
    reference = source()["blocks.0.ffn.0.weight"]
    errors = {}
    for group in (None, 256):
        checkpoint = load_checkpoint(write_int8(tmp_path / f"i8_{group}.safetensors", group=group))
        layer, _, _ = load_layer(checkpoint, "blocks.0.ffn.0")
        errors[group] = rel_err(layer.fp8.method.apply(layer, x), x @ reference.T)
    assert errors[256] < 0.6 * errors[None], errors


def test_weight_only_choice_keeps_int8_activations_in_high_precision(tmp_path):
    checkpoint = load_checkpoint(write_int8(tmp_path / "i8.safetensors"))
    layer, _, _ = load_layer(checkpoint, "blocks.0.attn.q", UserOptions(activation_scheme="none"))
    assert layer.fp8.method.kernel_for(layer, torch.device("cpu")).input_quant is None


def test_skipped_int8_layer_is_kept_with_its_rotation_for_the_loader_to_undo(tmp_path):
    checkpoint = load_checkpoint(write_int8(tmp_path / "i8.safetensors", group=64))
    options = UserOptions(skip_layers=("blocks.0.attn",))
    recipe = Fp8Recipe.for_checkpoint(None, options, int8_layers=checkpoint.int8_layers)
    decision = recipe.decide("blocks.0.attn.q", checkpoint.state_dict[f"{PREFIX}blocks.0.attn.q.weight"])
    assert decision.method is None and decision.stored_rotation == 64 and "blocks.0.attn" in decision.reason


def test_int8_weight_without_its_format_entry_is_an_error_naming_the_layer():
    recipe = Fp8Recipe.for_checkpoint(None, UserOptions(), int8_layers={"blocks.0.attn.q": 256})
    with pytest.raises(ValueError, match=r"blocks\.9\.ffn\.0: int8 weight without an int8_tensorwise format entry"):
        recipe.decide("blocks.9.ffn.0", torch.zeros(4, 4, dtype=torch.int8))


@pytest.mark.parametrize(("extra", "message"), [
    ({"convrot_groupsize": 128}, r"convrot_groupsize: a rotation group must be a power of 4.*got 128"),
    ({"convrot_groupsize": 1024}, r"convrot_groupsize 1024 does not divide its 256 input features"),
    ({"convrot": "yes"}, r"'convrot' must be true or false"),
])  # fmt: skip
def test_int8_files_comfyui_could_not_run_are_one_line_errors(tmp_path, extra, message):
    path = write_int8(tmp_path / "bad.safetensors", group=256, entry_extra=extra)
    with pytest.raises(CheckpointError, match=message) as error:
        load_checkpoint(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_int8_file_with_a_bad_scale_is_an_error_naming_the_tensor(tmp_path):
    path = write_int8(tmp_path / "i8.safetensors")
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    tensors[f"{PREFIX}blocks.0.attn.q.weight_scale"] = torch.ones(64, 2)
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"int8_tensorwise layer .*blocks\.0\.attn\.q' has a weight_scale"):
        load_checkpoint(path)
    tensors[f"{PREFIX}blocks.0.attn.q.weight_scale"] = torch.full((64, 1), float("nan"))
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.q\.weight_scale.*finite and > 0"):
        load_checkpoint(path)


def test_inspect_counts_int8_layers_and_their_rotation(tmp_path):
    report = inspect_checkpoint(write_int8(tmp_path / "i8.safetensors", group=256))
    assert report["formats"] == {"int8_tensorwise": 2}
    assert report["int8_layers"] == {"rotated in groups of 256": 2}
    assert not any("not FP8" in warning for warning in report["warnings"])
