import json
import struct

import pytest
import torch
from checkpoints import LAYERS, source_weights, write_dialect
from helpers import rel_err
from safetensors.torch import save_file

from fp8_quant.formats import (
    COMFY_QUANT,
    COMFY_SCALED,
    HIGH_PRECISION,
    PLAIN_FP8,
    WEIGHT_SCALE,
    CheckpointError,
    convert_checkpoint,
    load_checkpoint,
    read_header,
    scan_checkpoint,
)
from fp8_quant.formats.inspect import inspect_checkpoint
from fp8_quant.scheme import PER_CHANNEL, PER_TENSOR

PREFIXES = ["", "model.diffusion_model.", "diffusion_model."]


def dequantized(state_dict, name):
    weight = state_dict[f"{name}.weight"]
    scale = state_dict[f"{name}.weight_scale"]
    return weight.float() * (scale[:, None] if scale.dim() else scale)


def check_values(checkpoint, source, prefix, bound=0.04):
    for name in LAYERS:
        assert rel_err(dequantized(checkpoint.state_dict, prefix + name), source[f"{name}.weight"]) < bound, name
    assert checkpoint.state_dict[prefix + "head.weight"].dtype == torch.bfloat16
    assert checkpoint.state_dict[prefix + "blocks.0.norm.weight"].dtype == torch.bfloat16
    assert not any(
        key.endswith(("scaled_fp8", ".comfy_quant", ".scale_weight", ".scale_input")) for key in checkpoint.state_dict
    )


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(
    "dialect, options, granularity",
    [
        (WEIGHT_SCALE, {}, "tensor"),
        (WEIGHT_SCALE, {"scale_shape": "one"}, "tensor"),
        (WEIGHT_SCALE, {"group": PER_CHANNEL}, "channel"),
        (WEIGHT_SCALE, {"group": PER_CHANNEL, "scale_shape": "column"}, "channel"),
        (COMFY_SCALED, {}, "tensor"),
        (COMFY_QUANT, {}, "tensor"),
        (COMFY_QUANT, {"metadata_only": True}, "tensor"),
    ],
)
def test_each_dialect_loads_with_inferred_config(tmp_path, prefix, dialect, options, granularity):
    source = source_weights()
    path = write_dialect(tmp_path / "model.safetensors", dialect, source, prefix=prefix, **options)
    scan = scan_checkpoint(path)
    assert scan.dialect == dialect
    assert scan.prefix == prefix
    assert len(scan.fp8_layers) == len(LAYERS)
    checkpoint = load_checkpoint(path)
    check_values(checkpoint, source, prefix)
    config = checkpoint.config
    assert config.to_dict()["weight_granularity"] == granularity
    assert config.to_dict()["activation_scheme"] == "dynamic" and config.to_dict()["activation_granularity"] == "token"
    scale = checkpoint.state_dict[prefix + "blocks.0.attn.q.weight_scale"]
    assert scale.dtype == torch.float32 and scale.shape == ((64,) if granularity == "channel" else ())


@pytest.mark.parametrize("dialect", [WEIGHT_SCALE, COMFY_SCALED])
def test_static_input_scales_make_a_static_config(tmp_path, dialect):
    path = write_dialect(tmp_path / "m.safetensors", dialect, source_weights(), static=True)
    checkpoint = load_checkpoint(path)
    assert checkpoint.config.activation_scheme == "static"
    assert checkpoint.state_dict["blocks.0.attn.q.input_scale"].shape == ()


def test_plain_fp8_cast_gets_unit_scales(tmp_path):
    source = {key: value / 100 for key, value in source_weights().items()}
    path = write_dialect(tmp_path / "m.safetensors", PLAIN_FP8, source)
    checkpoint = load_checkpoint(path)
    assert checkpoint.scan.dialect == PLAIN_FP8
    assert any("plain fp8" in warning for warning in checkpoint.scan.warnings)
    assert checkpoint.state_dict["blocks.0.attn.q.weight_scale"].item() == 1.0
    # A plain cast has no scale to rescue small weights: the bound is loose, but the values are the source's.
    assert rel_err(dequantized(checkpoint.state_dict, "blocks.0.ffn.0"), source["blocks.0.ffn.0.weight"]) < 0.15


def test_high_precision_file_has_no_config(tmp_path):
    path = write_dialect(tmp_path / "m.safetensors", HIGH_PRECISION, source_weights())
    checkpoint = load_checkpoint(path)
    assert checkpoint.scan.dialect == HIGH_PRECISION and checkpoint.config is None


def test_e5m2_comfy_scaled(tmp_path):
    source = source_weights()
    path = write_dialect(tmp_path / "m.safetensors", COMFY_SCALED, source, fp8_dtype=torch.float8_e5m2)
    checkpoint = load_checkpoint(path)
    assert checkpoint.config.weight_dtype == torch.float8_e5m2
    check_values(checkpoint, source, "", bound=0.08)


def test_header_scan_reads_no_tensor_data(tmp_path, monkeypatch):
    path = write_dialect(tmp_path / "m.safetensors", WEIGHT_SCALE, source_weights(), group=PER_CHANNEL)
    import fp8_quant.formats.reader as reader

    monkeypatch.setattr(reader, "safe_open", None)  # any data read would fail
    scan = scan_checkpoint(path)
    layer = scan.layers["blocks.0.ffn.0"]
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.granularity == "channel"
    assert layer.weight_scale.shape == (128,) and layer.input_scale is None
    assert layer.nbytes == 128 * 64 + 128 * 4


# ---- round trips through our writer -------------------------------------------------------------------


@pytest.mark.parametrize(
    "output_format, per_channel, dialect",
    [("comfy-scaled", False, COMFY_SCALED), ("comfy-quant", False, COMFY_QUANT), ("weight-scale", True, WEIGHT_SCALE)],
)
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_convert_round_trip(tmp_path, output_format, per_channel, dialect, prefix):
    source = source_weights()
    src = tmp_path / "bf16.safetensors"
    save_file({prefix + key: value.to(torch.bfloat16) for key, value in source.items()}, str(src))
    dst = tmp_path / "fp8.safetensors"
    calls = []
    report = convert_checkpoint(
        src,
        dst,
        output_format,
        weight_group=PER_CHANNEL if per_channel else PER_TENSOR,
        progress=lambda i, n, k: calls.append(i),
    )
    assert set(report.quantized) == {prefix + name for name in LAYERS}
    assert report.skipped[prefix + "head"].startswith("matched") and "blocks.0.norm" not in report.quantized
    assert calls[-1] == len(calls)
    checkpoint = load_checkpoint(dst)
    assert checkpoint.scan.dialect == dialect
    assert checkpoint.scan.prefix == prefix
    check_values(checkpoint, source, prefix, bound=0.045)
    assert torch.equal(checkpoint.state_dict[prefix + "head.weight"], source["head.weight"].to(torch.bfloat16))
    header = read_header(dst)
    if output_format == "comfy-scaled":
        marker = header.tensors[prefix + "scaled_fp8"]
        assert marker.dtype == torch.float8_e4m3fn and marker.shape == (0,)
        assert header.tensors[prefix + "blocks.0.attn.q.scale_weight"].shape == ()  # the stock loader's shape
    if per_channel:
        assert header.tensors[prefix + "blocks.0.attn.q.weight_scale"].shape == (64, 1)
    assert report.bytes_out < report.bytes_in


def test_convert_skips_user_patterns_and_refuses_bad_requests(tmp_path):
    src = tmp_path / "bf16.safetensors"
    save_file({key: value.to(torch.float16) for key, value in source_weights().items()}, str(src))
    report = convert_checkpoint(src, tmp_path / "a.safetensors", skip_patterns=["blocks.0.attn"])
    assert report.quantized == ["blocks.0.ffn.0"]
    with pytest.raises(ValueError, match="per-channel"):
        convert_checkpoint(src, tmp_path / "b.safetensors", "comfy-scaled", weight_group=PER_CHANNEL)
    with pytest.raises(ValueError, match="output_format"):
        convert_checkpoint(src, tmp_path / "b.safetensors", "gguf")
    with pytest.raises(ValueError, match="overwrite"):
        convert_checkpoint(src, src)
    with pytest.raises(CheckpointError, match="already an fp8 checkpoint"):
        convert_checkpoint(tmp_path / "a.safetensors", tmp_path / "c.safetensors")


def test_convert_streams_one_tensor_at_a_time(tmp_path, monkeypatch):
    """The writer never holds more than one converted tensor: each is written before the next is made."""
    src = tmp_path / "bf16.safetensors"
    save_file({key: value.to(torch.bfloat16) for key, value in source_weights().items()}, str(src))
    import fp8_quant.formats.writer as writer

    live: list[int] = []
    made = {"count": 0}
    real_quantize = writer.quantize_weight

    def counting_quantize(*args, **kwargs):
        made["count"] += 1
        live.append(made["count"])
        return real_quantize(*args, **kwargs)

    monkeypatch.setattr(writer, "quantize_weight", counting_quantize)
    real_write = writer.write_streaming

    def checking_write(destination, plan, metadata, progress, overwrite=True):
        assert made["count"] == 0, "tensors were converted before the header was written"
        real_write(destination, plan, metadata, progress, overwrite)

    monkeypatch.setattr(writer, "write_streaming", checking_write)
    convert_checkpoint(src, tmp_path / "fp8.safetensors")
    assert made["count"] == len(LAYERS)


# ---- bad files ----------------------------------------------------------------------------------------


def test_truncated_file(tmp_path):
    path = write_dialect(tmp_path / "m.safetensors", WEIGHT_SCALE, source_weights())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"m\.safetensors.*outside the .* data bytes"):
        load_checkpoint(path)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        scan_checkpoint(path)


def raw_file(path, header_bytes: bytes, data: bytes = b"", claimed: int | None = None):
    size = len(header_bytes) if claimed is None else claimed
    path.write_bytes(struct.pack("<Q", size) + header_bytes + data)
    return path


def test_header_longer_than_file(tmp_path):
    path = raw_file(tmp_path / "m.safetensors", b"{}", claimed=10_000)
    with pytest.raises(CheckpointError, match="header runs past the end of the file") as caught:
        read_header(path)
    assert "10000" not in str(caught.value)


@pytest.mark.parametrize("header, message", [(b"[1, 2]", "not a safetensors file"), (b"{nope", "not valid JSON")])
def test_header_json(tmp_path, header, message):
    with pytest.raises(CheckpointError, match=message):
        read_header(raw_file(tmp_path / "m.safetensors", header))


def test_offsets_outside_data(tmp_path):
    header = json.dumps({"a.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    with pytest.raises(CheckpointError, match="'a.weight' lies at bytes 0..16"):
        read_header(raw_file(tmp_path / "m.safetensors", header, data=b"\0" * 8))
    header = json.dumps({"a.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    with pytest.raises(CheckpointError, match="needs 16"):
        read_header(raw_file(tmp_path / "m.safetensors", header, data=b"\0" * 8))


def test_unknown_dtype_and_pickle_refused(tmp_path):
    header = json.dumps({"a.weight": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}).encode()
    with pytest.raises(CheckpointError, match="unsupported dtype 'F4'"):
        read_header(raw_file(tmp_path / "m.safetensors", header, data=b"\0"))
    pickle_file = tmp_path / "model.ckpt"
    pickle_file.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(CheckpointError, match="only .safetensors"):
        scan_checkpoint(pickle_file)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0])
@pytest.mark.parametrize("dialect, key", [(WEIGHT_SCALE, "weight_scale"), (COMFY_SCALED, "scale_weight")])
def test_bad_scale_values(tmp_path, bad, dialect, key):
    path = write_dialect(tmp_path / "m.safetensors", dialect, source_weights())
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    tensors[f"blocks.0.attn.k.{key}"] = torch.tensor(bad)
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=rf"m\.safetensors: scale 'blocks\.0\.attn\.k\.{key}'"):
        load_checkpoint(path)
    assert inspect_checkpoint(path)["warnings"]


def edit(path, change):
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))
    return path


def test_scale_shape_fits_no_granularity(tmp_path):
    path = write_dialect(tmp_path / "m.safetensors", WEIGHT_SCALE, source_weights())
    edit(path, lambda t: t.__setitem__("blocks.0.attn.q.weight_scale", torch.ones(7)))
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.attn\.q\.weight_scale' has shape \[7\], which fits no"):
        scan_checkpoint(path)


def test_fp8_weight_without_required_scale(tmp_path):
    path = write_dialect(tmp_path / "m.safetensors", WEIGHT_SCALE, source_weights())
    edit(path, lambda t: t.pop("blocks.0.ffn.0.weight_scale"))
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.ffn\.0\.weight' has no weight_scale"):
        scan_checkpoint(path)


def test_scale_without_weight(tmp_path):
    path = write_dialect(tmp_path / "m.safetensors", WEIGHT_SCALE, source_weights())
    edit(path, lambda t: t.__setitem__("blocks.9.attn.q.weight_scale", torch.tensor(1.0)))
    with pytest.raises(CheckpointError, match="no matching weight"):
        scan_checkpoint(path)


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"{not json", "not valid JSON"),
        (b'{"format": "nvfp4"}', "layer 'blocks.0.attn.q' is in ComfyUI's nvfp4 format, which is not FP8; load"),
        (b'{"format": "int5"}', "names format 'int5'"),
        (b"[1]", "must be a JSON object"),
    ],
)
def test_bad_comfy_quant_entries(tmp_path, payload, message):
    path = write_dialect(tmp_path / "m.safetensors", COMFY_QUANT, source_weights())
    edit(path, lambda t: t.__setitem__("blocks.0.attn.q.comfy_quant", torch.tensor(list(payload), dtype=torch.uint8)))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_comfy_quant_format_must_match_weight(tmp_path):
    path = write_dialect(tmp_path / "m.safetensors", COMFY_QUANT, source_weights())
    payload = json.dumps({"format": "float8_e5m2"}).encode()
    edit(path, lambda t: t.__setitem__("blocks.0.attn.q.comfy_quant", torch.tensor(list(payload), dtype=torch.uint8)))
    with pytest.raises(CheckpointError, match="declares format float8_e5m2 but its weight is torch.float8_e4m3fn"):
        load_checkpoint(path)


def test_bad_quantization_metadata(tmp_path):
    tensors = {"a.weight": torch.ones(16, 16).to(torch.float8_e4m3fn), "a.weight_scale": torch.tensor(1.0)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"_quantization_metadata": "{broken"})
    with pytest.raises(CheckpointError, match="_quantization_metadata is not valid JSON"):
        scan_checkpoint(path)
    save_file(
        tensors, str(path), metadata={"_quantization_metadata": json.dumps({"layers": {"a": {"format": "int4"}}})}
    )
    with pytest.raises(CheckpointError, match="names format 'int4'"):
        load_checkpoint(path)


# ---- inspect and the CLI ------------------------------------------------------------------------------


def test_inspect_reports_dialect_counts_bytes_and_health(tmp_path):
    path = write_dialect(tmp_path / "m.safetensors", COMFY_SCALED, source_weights(), prefix="model.diffusion_model.")
    result = inspect_checkpoint(path)
    assert result["dialect"] == COMFY_SCALED and result["prefix"] == "model.diffusion_model."
    assert result["weights_by_dtype"] == {"bfloat16": 2, "float8_e4m3fn": 3}
    assert result["fp8_bytes"] == sum(o * i + 4 for o, i in LAYERS.values())
    assert result["scales"] == 3 and result["scale_nan"] == 0 and result["scale_min"] > 0
    assert result["warnings"] == []


def test_cli_inspect_and_convert(tmp_path, capsys):
    from fp8_quant.__main__ import main

    src = tmp_path / "bf16.safetensors"
    save_file({key: value.to(torch.bfloat16) for key, value in source_weights().items()}, str(src))
    dst = tmp_path / "fp8.safetensors"
    assert main(["convert", str(src), str(dst), "--format", "comfy-quant", "--skip", "blocks.0.ffn"]) == 0
    out = capsys.readouterr()
    assert "2 layers quantized" in out.out and out.err == ""  # no progress bar: stderr is not a terminal
    assert main(["inspect", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "dialect: comfy-quant" in out and "fp8 layers: 2" in out
    assert main(["inspect", "--json", str(dst)]) == 0
    assert json.loads(capsys.readouterr().out)["formats"] == {"float8_e4m3fn": 2}
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x01")
    assert main(["inspect", str(broken)]) == 2
    assert "broken.safetensors: truncated" in capsys.readouterr().err


def test_gap_overlap_and_trailing_bytes(tmp_path):
    def entry(begin, end):
        return {"dtype": "F32", "shape": [(end - begin) // 4], "data_offsets": [begin, end]}

    cases = [
        ({"a.weight": entry(0, 8), "b.weight": entry(4, 12)}, 12, "overlaps"),
        ({"a.weight": entry(0, 8), "b.weight": entry(12, 16)}, 16, "gap at byte 8"),
        ({"a.weight": entry(0, 8)}, 12, "4 bytes after the last tensor"),
    ]
    for header, size, message in cases:
        path = raw_file(tmp_path / "m.safetensors", json.dumps(header).encode(), data=b"\0" * size)
        with pytest.raises(CheckpointError, match=message):
            read_header(path)


def test_random_corruption_only_ever_gives_checkpoint_errors(tmp_path):
    """Flip bytes and cut files at random: every failure must be a CheckpointError naming the file."""
    good = write_dialect(tmp_path / "good.safetensors", COMFY_QUANT, source_weights()).read_bytes()
    (header_size,) = struct.unpack("<Q", good[:8])
    generator = torch.Generator().manual_seed(0)
    path = tmp_path / "fuzz.safetensors"
    outcomes = {"ok": 0, "error": 0}
    for trial in range(300):
        data = bytearray(good)
        if trial % 3 == 0:
            data = data[: int(torch.randint(0, len(good), (1,), generator=generator))]
        else:
            for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
                position = int(torch.randint(0, 8 + header_size, (1,), generator=generator))
                data[position] = int(torch.randint(0, 256, (1,), generator=generator))
        path.write_bytes(bytes(data))
        try:
            load_checkpoint(path)
            outcomes["ok"] += 1
        except CheckpointError as error:
            assert "fuzz.safetensors" in str(error)
            outcomes["error"] += 1
    assert outcomes["error"] > 100


def test_block_scale_on_a_high_precision_weight_is_named(tmp_path):
    """A bf16 weight with a scale ComfyUI would multiply in: only one value or one per row fits."""
    path = write_dialect(tmp_path / "m.safetensors", WEIGHT_SCALE, source_weights())
    weight = source_weights()["blocks.0.ffn.0.weight"].to(torch.bfloat16)  # 128 x 64
    edit(
        path,
        lambda t: t.update({"blocks.0.ffn.0.weight": weight, "blocks.0.ffn.0.weight_scale": torch.full((1, 1), 2.0)}),
    )
    loaded = load_checkpoint(path).state_dict["blocks.0.ffn.0.weight"]  # one value: fine, multiplied in
    assert loaded.dtype == torch.bfloat16 and torch.equal(loaded, weight * 2)  # x2 is exact in bf16
    edit(path, lambda t: t.__setitem__("blocks.0.ffn.0.weight_scale", torch.ones(128, 2)))  # groups of 32
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.ffn\.0\.weight_scale' of shape \[128, 2\] does not fit"):
        load_checkpoint(path)
