"""The dialects' registry: every dialect the reader recognises is in it and reads back; every written one writes the
header ComfyUI and this pack expect (spelled out here by hand, not taken from the writer) and round-trips
write -> recognise -> read; an mxfp8 file says mxfp8."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from checkpoints import LAYERS, source_weights, write_dialect, write_mxfp8
from helpers import rel_err
from safetensors.torch import save_file
from torch import nn

from fp8_quant import Fp8Config, prepare_model_for_fp8
from fp8_quant.formats import (
    DIALECTS,
    OUTPUT_DIALECTS,
    OUTPUT_FORMATS,
    CheckpointError,
    convert_checkpoint,
    dialect_named,
    load_checkpoint,
    read_header,
    scan_checkpoint,
)
from fp8_quant.formats.dialects import output_dialect
from fp8_quant.formats.inspect import format_inspection, inspect_checkpoint
from fp8_quant.formats.model_writer import save_quantized_model
from fp8_quant.fp8_utils import dequantize
from fp8_quant.scheme import PER_CHANNEL, PER_TENSOR

# The dialects as files, workflows and the CLI spell them (the names a user has written down must keep working).
READ_NAMES = {"weight-scale", "comfy-scaled", "comfy-quant", "plain-fp8", "high-precision"}
WRITTEN_NAMES = ("comfy-scaled", "comfy-quant", "weight-scale")  # in the order the CLI and Save FP8 Model offer


def test_the_registry_holds_every_dialect_by_its_name_and_the_written_ones_in_order():
    assert {str(dialect) for dialect in DIALECTS} == READ_NAMES
    assert OUTPUT_FORMATS == WRITTEN_NAMES and tuple(OUTPUT_DIALECTS) == WRITTEN_NAMES
    assert all(type(name) is str for name in OUTPUT_FORMATS)  # plain strings for widgets and argparse
    for name in READ_NAMES:
        dialect = dialect_named(name)
        assert dialect == name and json.dumps({"d": dialect}) == json.dumps({"d": name}) and f"{dialect}" == name
        assert copy.deepcopy(dialect) is dialect and pickle.loads(pickle.dumps(dialect)) is dialect
    allowed = r"allowed values: \['comfy-scaled', 'comfy-quant', 'weight-scale'\]"
    with pytest.raises(ValueError, match=f"output_format: 'plain-fp8' is not allowed; {allowed}"):
        output_dialect("plain-fp8")
    with pytest.raises(ValueError, match="dialect: 'gguf' is not allowed"):
        dialect_named("gguf")


def _files_of_every_layout(folder) -> dict[str, object]:
    """One file per layout this pack reads, written by the test's own writers (not the pack's)."""
    files = {name: write_dialect(folder / f"{name}.safetensors", name, source_weights()) for name in READ_NAMES}
    files["comfy-quant (metadata)"] = write_dialect(
        folder / "meta.safetensors", "comfy-quant", source_weights(), metadata_only=True
    )
    files["comfy-quant (mxfp8)"] = write_mxfp8(folder / "mx.safetensors", source_weights())
    return files


def test_every_layout_the_reader_accepts_is_a_registry_dialect_and_every_dialect_is_recognised(tmp_path):
    recognised = {}
    for layout, path in _files_of_every_layout(tmp_path).items():
        checkpoint = load_checkpoint(path)
        assert checkpoint.scan.dialect in DIALECTS, layout
        recognised[layout] = checkpoint.scan.dialect
        assert layout.split(" ")[0] == checkpoint.scan.dialect, layout
    assert set(recognised.values()) == set(DIALECTS)  # a new dialect needs a file here (and a writer in checkpoints)


@pytest.mark.parametrize("name", WRITTEN_NAMES)
def test_each_written_dialect_round_trips_through_convert(tmp_path, name):
    source = source_weights()
    src = tmp_path / "bf16.safetensors"
    save_file({key: value.to(torch.bfloat16) for key, value in source.items()}, str(src))
    group = PER_CHANNEL if output_dialect(name).holds_group(PER_CHANNEL) else PER_TENSOR
    out = convert_checkpoint(src, tmp_path / "fp8.safetensors", name, weight_group=group)
    checkpoint = load_checkpoint(tmp_path / "fp8.safetensors")
    assert checkpoint.scan.dialect == name and out.quantized
    for layer in LAYERS:
        weight = checkpoint.state_dict[f"{layer}.weight"]
        real = dequantize(weight, checkpoint.state_dict[f"{layer}.weight_scale"], group=group)
        assert weight.dtype == torch.float8_e4m3fn
        assert rel_err(real, source[f"{layer}.weight"]) < 0.045, (name, layer)


class TwoLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(64, 32)
        self.norm = nn.LayerNorm(32)


@pytest.mark.parametrize("name", WRITTEN_NAMES)
def test_each_written_dialect_round_trips_through_save(tmp_path, name):
    torch.manual_seed(0)
    model = TwoLinears()
    reference = model.q.weight.detach().clone()
    prepare_model_for_fp8(model, Fp8Config(weight_granularity="tensor", activation_scheme="none"))
    save_quantized_model(model, tmp_path / "m.safetensors", name)
    checkpoint = load_checkpoint(tmp_path / "m.safetensors")
    assert checkpoint.scan.dialect == name
    real = dequantize(checkpoint.state_dict["q.weight"], checkpoint.state_dict["q.weight_scale"])
    assert rel_err(real, reference) < 0.045


def _header(path) -> tuple[dict[str, tuple[str, list[int]]], dict[str, str]]:
    header = read_header(path)
    tensors = {key: (str(info.dtype).removeprefix("torch."), list(info.shape)) for key, info in header.tensors.items()}
    return tensors, header.metadata


P = "model.diffusion_model."
# A 4x8 linear with a calibrated input scale, a norm kept, as each written dialect stores them (by hand, from
# ComfyUI's and vLLM's layouts): comfy-scaled names its scales scale_weight/scale_input and marks the file with an
# empty fp8 tensor; comfy-quant gives each fp8 layer a uint8 JSON entry; weight-scale keeps per-channel scales
# [N, 1].
EXPECTED_HEADERS = {
    "comfy-scaled": (
        {
            P + "q.weight": ("float8_e4m3fn", [4, 8]),
            P + "q.scale_weight": ("float32", []),
            P + "q.scale_input": ("float32", []),
            P + "norm.weight": ("bfloat16", [8]),
            P + "scaled_fp8": ("float8_e4m3fn", [0]),
        },
        '{"format": "comfy-scaled", "weight_group": "per-tensor"}',
        PER_TENSOR,
    ),
    "comfy-quant": (
        {
            P + "q.weight": ("float8_e4m3fn", [4, 8]),
            P + "q.weight_scale": ("float32", []),
            P + "q.input_scale": ("float32", []),
            P + "q.comfy_quant": ("uint8", [len(b'{"format": "float8_e4m3fn"}')]),
            P + "norm.weight": ("bfloat16", [8]),
        },
        '{"format": "comfy-quant", "weight_group": "per-tensor"}',
        PER_TENSOR,
    ),
    "weight-scale": (
        {
            P + "q.weight": ("float8_e4m3fn", [4, 8]),
            P + "q.weight_scale": ("float32", [4, 1]),
            P + "q.input_scale": ("float32", []),
            P + "norm.weight": ("bfloat16", [8]),
        },
        '{"format": "weight-scale", "weight_group": "per-channel"}',
        PER_CHANNEL,
    ),
}


@pytest.mark.parametrize("name", WRITTEN_NAMES)
def test_each_written_dialect_writes_the_header_spelled_out_by_hand(tmp_path, name):
    expected_tensors, expected_info, group = EXPECTED_HEADERS[name]
    src = tmp_path / "bf16.safetensors"
    weights = {P + "q.weight": torch.randn(4, 8), P + "norm.weight": torch.ones(8)}
    save_file({key: value.to(torch.bfloat16) for key, value in weights.items()}, str(src), metadata={"a": "b"})
    out = tmp_path / "fp8.safetensors"
    convert_checkpoint(src, out, name, weight_group=group, input_scales={"q": torch.tensor(0.25)})
    tensors, metadata = _header(out)
    assert tensors == expected_tensors
    assert metadata == {"a": "b", "fp8_quant": expected_info}
    with safe_tensors(out) as handle:
        assert handle.get_tensor(P + ("q.scale_input" if name == "comfy-scaled" else "q.input_scale")).item() == 0.25
        if name == "comfy-quant":
            assert json.loads(bytes(handle.get_tensor(P + "q.comfy_quant").tolist())) == {"format": "float8_e4m3fn"}


def safe_tensors(path):
    from safetensors import safe_open

    return safe_open(str(path), framework="pt")


def test_a_dialect_that_is_only_read_is_refused_as_an_output_and_comfyuis_hold_one_scale_per_tensor(tmp_path):
    src = tmp_path / "bf16.safetensors"
    save_file({"q.weight": torch.randn(4, 8).to(torch.bfloat16)}, str(src))
    for name in READ_NAMES - set(WRITTEN_NAMES):
        with pytest.raises(ValueError, match=f"output_format: '{name}' is not allowed"):
            convert_checkpoint(src, tmp_path / "o.safetensors", name)
    for name in ("comfy-scaled", "comfy-quant"):
        with pytest.raises(ValueError, match=f"only written in the 'weight-scale' format: .* per tensor in '{name}'"):
            convert_checkpoint(src, tmp_path / "o.safetensors", name, weight_group=PER_CHANNEL)
    assert not (tmp_path / "o.safetensors").exists()


def test_an_mxfp8_file_says_mxfp8_and_a_block_file_says_its_block(tmp_path):
    mx = write_mxfp8(tmp_path / "mx.safetensors", source_weights())
    words = "mxfp8 (fp8 e4m3, groups of 32 per channel, power-of-two scales)"
    assert load_checkpoint(mx).scan.weight_schemes() == {words: len(LAYERS)}
    report = inspect_checkpoint(mx)
    assert report["weights"] == {words: len(LAYERS)}
    assert f"fp8 weights: {words} 3" in format_inspection(report)
    plain = write_dialect(tmp_path / "ws.safetensors", "weight-scale", source_weights(), group=PER_CHANNEL)
    assert inspect_checkpoint(plain)["weights"] == {"fp8 e4m3, per-channel": len(LAYERS)}


def test_the_comfy_scaled_marker_rule_and_the_comfy_quant_entry_rule_belong_to_their_dialects(tmp_path):
    """A dialect's own check runs only for its files: a marker of another fp8 dtype is an error in comfy-scaled;
    an fp8 layer without an entry is an error in comfy-quant."""
    path = write_dialect(tmp_path / "cs.safetensors", "comfy-scaled", source_weights())
    tensors = load_tensors(path)
    tensors["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e5m2)
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match="scaled_fp8 marker says torch.float8_e5m2"):
        scan_checkpoint(path)
    path = write_dialect(tmp_path / "cq.safetensors", "comfy-quant", source_weights())
    tensors = load_tensors(path)
    del tensors["blocks.0.attn.k.comfy_quant"]
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.attn\.k\.weight' has neither a \.comfy_quant entry"):
        scan_checkpoint(path)


def load_tensors(path):
    with safe_tensors(path) as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}
