"""Block-scaled checkpoints: DeepSeek/vLLM ``weight_scale_inv`` and ``weight_scale`` of block shape, ComfyUI 0.30's
``mxfp8`` (swizzled e8m0 scales), the formats that are not FP8, and what ``inspect`` says about them. The files are
written by ``tests/checkpoints.py``, independently of the reader."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoints import LAYERS, quantize_mxfp8, source_weights, to_blocked, write_mxfp8
from helpers import rel_err
from safetensors.torch import save_file

from fp8_quant.formats import WEIGHT_SCALE, CheckpointError, load_checkpoint, scan_checkpoint
from fp8_quant.formats.comfy_formats import crop_mx_padding, swizzle_mx_scale, unswizzle_mx_scale
from fp8_quant.formats.inspect import format_inspection, inspect_checkpoint
from fp8_quant.fp8_utils import dequantize, quantize_weight
from fp8_quant.scheme import BLOCK_128, GROUP_128, MX_BLOCK

BIG_LAYERS = {"blocks.0.attn.qkv": (384, 256), "blocks.0.mlp.fc2": (256, 640)}


def big_source(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out_features, in_features) in BIG_LAYERS.items():
        weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
        tensors[f"{name}.weight"] = weight * torch.logspace(-2, 1, out_features)[:, None]
        tensors[f"{name}.bias"] = torch.randn(out_features, generator=generator)
    tensors["norm.weight"] = torch.ones(256)
    return tensors


def write_block_file(path, source, scale_name="weight_scale_inv", group=BLOCK_128, prefix="model."):
    """A DeepSeek/vLLM-style file: fp8 weights, one float32 scale per block, nothing else quantized."""
    tensors = {}
    for key, value in source.items():
        layer = key.removesuffix(".weight")
        if key.endswith(".weight") and layer in BIG_LAYERS:
            q, scale = quantize_weight(value, group=group)
            tensors[prefix + key] = q
            tensors[f"{prefix}{layer}.{scale_name}"] = scale
        else:
            tensors[prefix + key] = value.to(torch.bfloat16)
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize(
    "scale_name, group, granularity",
    [
        ("weight_scale_inv", BLOCK_128, "block 128x128"),
        ("weight_scale", BLOCK_128, "block 128x128"),
        ("weight_scale", GROUP_128, "groups of 128 per channel"),
    ],
)
def test_block_scaled_file_loads_to_the_canonical_form(tmp_path, scale_name, group, granularity):
    source = big_source()
    path = write_block_file(tmp_path / "ds.safetensors", source, scale_name, group)
    scan = scan_checkpoint(path)
    assert scan.dialect == WEIGHT_SCALE
    assert {layer.granularity for layer in scan.fp8_layers} == {granularity}
    checkpoint = load_checkpoint(path)
    assert checkpoint.config.to_dict()["weight_granularity"] == "block"
    for name, (out_features, in_features) in BIG_LAYERS.items():
        weight = checkpoint.state_dict[f"model.{name}.weight"]
        scale = checkpoint.state_dict[f"model.{name}.weight_scale"]
        assert f"model.{name}.{scale_name}" not in checkpoint.state_dict or scale_name == "weight_scale"
        assert scale.shape == (-(-out_features // group.col), -(-in_features // 128))
        assert rel_err(dequantize(weight, scale, group=group), source[f"{name}.weight"]) < 0.04


def test_block_scale_of_a_wrong_shape_names_the_tensor_and_the_shapes_it_may_have(tmp_path):
    path = write_block_file(tmp_path / "ds.safetensors", big_source())
    tensors = load_tensors(path)
    tensors["model.blocks.0.mlp.fc2.weight_scale_inv"] = torch.ones(2, 4)
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"'model\.blocks\.0\.mlp\.fc2\.weight_scale_inv' has shape \[2, 4\]"):
        scan_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"\[2, 5\] \(block 128x128\)"):
        scan_checkpoint(path)


def load_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("rows, groups", [(64, 2), (200, 7), (256, 8), (130, 5)])
def test_mx_scale_swizzle_matches_the_kitchen_layout(rows, groups):
    exponents = torch.randint(0, 255, (rows, groups), generator=torch.Generator().manual_seed(rows), dtype=torch.uint8)
    stored = to_blocked(exponents)
    assert torch.equal(swizzle_mx_scale(exponents), stored)
    assert torch.equal(unswizzle_mx_scale(stored, rows, groups), exponents)


@pytest.mark.parametrize("scale_as_uint8", [False, True])
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_mxfp8_file_reads_exactly(tmp_path, scale_as_uint8, prefix):
    source = source_weights()
    path = write_mxfp8(tmp_path / "mx.safetensors", source, prefix, scale_as_uint8)
    checkpoint = load_checkpoint(path)
    for name in LAYERS:
        weight = checkpoint.state_dict[f"{prefix}{name}.weight"]
        scale = checkpoint.state_dict[f"{prefix}{name}.weight_scale"]
        _, _, expected_scale = quantize_mxfp8(source[f"{name}.weight"])
        assert torch.equal(scale, expected_scale)  # powers of two, decoded exactly
        assert rel_err(dequantize(weight, scale, group=MX_BLOCK), source[f"{name}.weight"]) < 0.04
    assert {layer.granularity for layer in checkpoint.scan.fp8_layers} == {"groups of 32 per channel"}


def test_mxfp8_padded_weight_is_cropped_to_the_model(tmp_path):
    source = {"blocks.0.attn.q.weight": torch.randn(40, 48), "blocks.0.attn.q.bias": torch.zeros(40)}
    path = write_mxfp8(tmp_path / "mx.safetensors", source)
    checkpoint = load_checkpoint(path)
    weight = checkpoint.state_dict["blocks.0.attn.q.weight"]
    scale = checkpoint.state_dict["blocks.0.attn.q.weight_scale"]
    assert weight.shape == (64, 64) and scale.shape == (64, 2)
    cropped_weight, cropped_scale = crop_mx_padding(weight, scale, 40, 48)
    assert cropped_weight.shape == (40, 48) and cropped_scale.shape == (40, 2)
    assert rel_err(dequantize(cropped_weight, cropped_scale, group=MX_BLOCK), source["blocks.0.attn.q.weight"]) < 0.04
    assert crop_mx_padding(weight, scale, 64, 64) is None  # nothing to cut


def test_mxfp8_scale_of_a_wrong_shape_is_an_error(tmp_path):
    path = write_mxfp8(tmp_path / "mx.safetensors", source_weights())
    tensors = load_tensors(path)
    tensors["blocks.0.ffn.0.weight_scale"] = torch.zeros(128, 2, dtype=torch.uint8)
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"mxfp8 layer 'blocks\.0\.ffn\.0' .* e8m0 scales \[128, 4\]"):
        load_checkpoint(path)


NOT_FP8 = {
    "nvfp4": {
        "weight": torch.zeros(64, 16, dtype=torch.uint8),
        "weight_scale": torch.ones(128, 4).to(torch.float8_e4m3fn),
        "weight_scale_2": torch.tensor(1.0),
    },
    "convrot_w4a4": {"weight": torch.zeros(64, 16, dtype=torch.int8), "weight_scale": torch.ones(64)},
}


@pytest.mark.parametrize("fmt", list(NOT_FP8))
@pytest.mark.parametrize("in_metadata", [False, True])
def test_formats_that_are_not_fp8_get_one_line_naming_comfyui_loader(tmp_path, fmt, in_metadata):
    tensors = {f"model.diffusion_model.blocks.0.attn.q.{k}": v for k, v in NOT_FP8[fmt].items()}
    tensors["model.diffusion_model.head.weight"] = torch.randn(16, 64).to(torch.bfloat16)
    metadata = None
    entry = {"format": fmt}
    if in_metadata:
        layers = {"blocks.0.attn.q": entry}
        metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    else:
        payload = torch.tensor(list(json.dumps(entry).encode()), dtype=torch.uint8)
        tensors["model.diffusion_model.blocks.0.attn.q.comfy_quant"] = payload
    path = tmp_path / f"{fmt}.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert "\n" not in message
    assert str(path) in message and "'blocks.0.attn.q'" in message and f"ComfyUI's {fmt} format" in message
    assert "not FP8" in message and "Load Diffusion Model" in message
    report = inspect_checkpoint(path)  # inspect describes such a file rather than refusing it
    assert report["formats"] == {fmt: 1}
    assert any("not FP8" in warning for warning in report["warnings"])


def test_inspect_shows_block_shapes_and_scale_health(tmp_path):
    block_file = write_block_file(tmp_path / "ds.safetensors", big_source())
    report = inspect_checkpoint(block_file)
    assert report["granularity"] == {"block 128x128": 2}
    assert report["blocks"] == {
        "block 128x128": {"layers": 2, "scale": "weight_scale_inv (float32)", "scale_shapes": [[2, 5], [3, 2]]}
    }
    text = format_inspection(report)
    assert "blocks: block 128x128 in 2 layers, scales weight_scale_inv (float32) [2, 5] .. [3, 2]" in text
    assert report["scale_nonpositive"] == 0 and report["scale_nan"] == 0

    source = source_weights()
    source["blocks.0.ffn.0.weight"][:, :32] = 0  # one all-zero group per row: scale byte 0, not a bad scale
    mx_file = write_mxfp8(tmp_path / "mx.safetensors", source)
    report = inspect_checkpoint(mx_file)
    assert report["formats"] == {"mxfp8": 3}
    assert report["blocks"]["groups of 32 per channel"]["scale"] == "weight_scale (e8m0, swizzled)"
    assert report["mxfp8_zero_groups"] == 128 and report["scale_nonpositive"] == 0 and not report["warnings"]
    assert 0 < report["scale_min"] <= report["scale_max"] < 1
    assert "mxfp8 all-zero groups 128" in format_inspection(report)


def test_mxfp8_layer_runs_dequantized_and_says_why(tmp_path):
    from fp8_quant import Fp8Recipe, UserOptions
    from fp8_quant.kernels import ChannelWiseScaledMMKernel, explain_choice

    checkpoint = load_checkpoint(write_mxfp8(tmp_path / "mx.safetensors", source_weights()))
    recipe = Fp8Recipe.for_checkpoint(checkpoint.config, UserOptions())
    layer = torch.nn.Linear(64, 128)
    layer.weight = torch.nn.Parameter(checkpoint.state_dict["blocks.0.ffn.0.weight"], requires_grad=False)
    layer.weight_scale = checkpoint.state_dict["blocks.0.ffn.0.weight_scale"]
    layer.input_scale = None
    method = recipe.decide("blocks.0.ffn.0", layer.weight).method
    method.process_weights_after_loading(layer, "blocks.0.ffn.0")
    assert layer.fp8.layer_config.weight_quant_key.group_shape == MX_BLOCK
    ok, reason = ChannelWiseScaledMMKernel.can_implement(layer.fp8.layer_config)
    assert not ok and "mxfp8" in reason and "capability 10.0+" in reason
    assert explain_choice(layer.fp8.layer_config, "cpu")[0].name == "dequant"
    x = torch.randn(5, 64)
    expected = x @ source_weights()["blocks.0.ffn.0.weight"].t() + layer.bias
    assert rel_err(method.apply(layer, x, layer.bias), expected) < 0.04
