"""Hostile and broken inputs: each is refused by name (file, tensor, limit) in bounded time, or loaded correctly.

Files are written by hand (struct + json), independent of the pack's writer, so a check can see the bytes it makes.
Every read that could block or grow runs under ``signal.alarm``: a regression fails the test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import time
from pathlib import Path

import pytest
import torch

from fp8_quant.__main__ import main
from fp8_quant.formats import CheckpointError, load_checkpoint, read_header
from fp8_quant.formats.calibration import read_input_scales
from fp8_quant.formats.inspect import inspect_checkpoint
from fp8_quant.formats.safe_io import MAX_LAYER_ENTRY_BYTES, MAX_TENSORS, json_depth

NAMES = {
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.float32: "F32",
    torch.int8: "I8",
    torch.bfloat16: "BF16",
    torch.uint8: "U8",
    torch.float8_e8m0fnu: "F8_E8M0",
}


@contextlib.contextmanager
def within(seconds: int):
    """Fail (not hang) when the block takes longer than ``seconds``."""

    def expired(signum, frame):
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def write_raw(path: Path, header: dict | bytes, data: bytes = b"") -> Path:
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    header: dict = {"__metadata__": metadata} if metadata else {}
    data = b""
    for name, tensor in tensors.items():
        raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[name] = {
            "dtype": NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    return write_raw(path, header, data)


def fp8_file(path: Path, bad_bytes: list[int] = (), dtype=torch.float8_e4m3fn) -> Path:
    weight = (torch.randn(32, 16) * 100).clamp(-400, 400).to(dtype)
    raw = weight.view(torch.uint8).flatten()
    for index, value in enumerate(bad_bytes):
        raw[index * 7] = value
    return write_tensors(
        path, {"blocks.0.q.weight": raw.view(dtype).reshape(32, 16), "blocks.0.q.weight_scale": torch.tensor(0.01)}
    )


# --- point 2: values that would poison the model ---


@pytest.mark.parametrize(
    ("dtype", "bad"),
    [
        (torch.float8_e4m3fn, [0x7F]),
        (torch.float8_e4m3fn, [0xFF]),
        (torch.float8_e4m3fn, [0x7F, 0xFF]),
        (torch.float8_e5m2, [0x7C]),
        (torch.float8_e5m2, [0xFC]),
        (torch.float8_e5m2, [0x7D]),
        (torch.float8_e5m2, [0xFF]),
    ],
)
def test_fp8_nan_and_inf_bytes_are_refused_naming_file_and_tensor(tmp_path, dtype, bad):
    path = fp8_file(tmp_path / "nan.safetensors", bad, dtype)
    with pytest.raises(
        CheckpointError, match=rf"nan\.safetensors: fp8 weight 'blocks\.0\.q\.weight' holds {len(bad)} "
    ):
        load_checkpoint(path)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_largest_finite_fp8_bytes_load(tmp_path, dtype):
    """The neighbours of the NaN patterns (±max, 0x7E/0xFE for e4m3fn, 0x7B/0xFB for e5m2) are values, not NaN."""
    top = 0x7E if dtype == torch.float8_e4m3fn else 0x7B
    path = fp8_file(tmp_path / "max.safetensors", [top, 0x80 | top], dtype)
    weight = load_checkpoint(path).state_dict["blocks.0.q.weight"]
    assert bool(torch.isfinite(weight.float()).all()) and weight.float().abs().max() == torch.finfo(dtype).max


def test_int8_weight_with_scale_loads_as_float_values(tmp_path):
    values = torch.tensor([[-111, 76], [-90, -55]], dtype=torch.int8)
    path = write_tensors(
        tmp_path / "int8.safetensors",
        {
            "layer.weight": values,
            "layer.weight_scale": torch.tensor(0.01),
            "other.weight": torch.randn(2, 2, dtype=torch.bfloat16),
        },
    )
    weight = load_checkpoint(path).state_dict["layer.weight"]
    assert weight.is_floating_point()
    torch.testing.assert_close(weight, torch.tensor([[-1.11, 0.76], [-0.90, -0.55]]), rtol=1e-6, atol=0)


def test_int8_tensorwise_comfy_format_keeps_its_int8_values_and_scale(tmp_path):
    entry = torch.tensor(list(json.dumps({"format": "int8_tensorwise"}).encode()), dtype=torch.uint8)
    path = write_tensors(
        tmp_path / "i8.safetensors",
        {
            "layer.weight": torch.ones(4, 4, dtype=torch.int8),
            "layer.weight_scale": torch.tensor(0.5),
            "layer.comfy_quant": entry,
        },
    )
    checkpoint = load_checkpoint(path)
    assert checkpoint.state_dict["layer.weight"].dtype == torch.int8
    assert checkpoint.state_dict["layer.weight_scale"].shape == ()
    assert checkpoint.int8_layers == {"layer": None}


def test_zero_dim_weight_with_scale_loads_scaled(tmp_path):
    path = write_tensors(
        tmp_path / "zd.safetensors",
        {
            "layer.weight": torch.tensor(2.0, dtype=torch.bfloat16),
            "layer.weight_scale": torch.tensor(0.5),
            "fp.weight": torch.ones(16, 16).to(torch.float8_e4m3fn),
            "fp.weight_scale": torch.tensor(1.0),
        },
    )
    weight = load_checkpoint(path).state_dict["layer.weight"]  # was IndexError: tuple index out of range
    assert weight.shape == () and float(weight) == 1.0


# --- point 4: reads bounded before they allocate ---


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "directory"])
def test_non_regular_inputs_are_refused_by_name_without_blocking(tmp_path, kind):
    path = tmp_path / f"{kind}.safetensors"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev_zero":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    for read in (read_header, load_checkpoint, inspect_checkpoint):
        with within(5), pytest.raises(CheckpointError, match=rf"{kind}\.safetensors: is a .*not a regular file"):
            read(path)


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_calibrated_file_must_be_regular(tmp_path, kind):
    path = tmp_path / f"scales_{kind}.json"
    os.mkfifo(path) if kind == "fifo" else path.symlink_to("/dev/zero")
    with within(5), pytest.raises(CheckpointError, match=rf"scales_{kind}\.json: is a .*not a regular file"):
        read_input_scales(path)


def test_cli_refuses_fifo_for_inspect_convert_and_calibrated(tmp_path, capsys):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    good = write_tensors(tmp_path / "good.safetensors", {"a.weight": torch.randn(16, 16)})
    fifo_json = tmp_path / "pipe.json"
    os.mkfifo(fifo_json)
    runs = [
        ["inspect", str(fifo)],
        ["convert", str(fifo), str(tmp_path / "o.safetensors")],
        ["convert", str(good), str(tmp_path / "o2.safetensors"), "--calibrated", str(fifo_json)],
    ]
    for argv, name in zip(runs, ["pipe.safetensors", "pipe.safetensors", "pipe.json"]):
        with within(10):
            assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and name in err and "FIFO" in err and "\n" not in err


def test_deep_json_header_is_refused_by_depth(tmp_path):
    depth = 100_000
    header = b'{"__metadata__": {"x": ' + b"[" * depth + b"]" * depth + b"}}"
    path = write_raw(tmp_path / "deep.safetensors", header)
    with (
        within(10),
        pytest.raises(CheckpointError, match=rf"deep\.safetensors: header is JSON nested {depth + 2} deep"),
    ):
        read_header(path)


def test_deep_quantization_metadata_and_comfy_quant_are_refused(tmp_path):
    deep = "[" * 50_000 + "]" * 50_000
    fp8 = torch.ones(16, 16).to(torch.float8_e4m3fn)
    path = write_tensors(
        tmp_path / "qm.safetensors",
        {"a.weight": fp8, "a.weight_scale": torch.tensor(1.0)},
        {"_quantization_metadata": deep},
    )
    with (
        within(10),
        pytest.raises(CheckpointError, match=r"qm\.safetensors: metadata _quantization_metadata is JSON nested"),
    ):
        load_checkpoint(path)
    entry = torch.tensor(list(deep[:40_000].encode()), dtype=torch.uint8)
    path = write_tensors(
        tmp_path / "cq.safetensors", {"a.weight": fp8, "a.weight_scale": torch.tensor(1.0), "a.comfy_quant": entry}
    )
    with within(10), pytest.raises(CheckpointError, match=r"cq\.safetensors: 'a\.comfy_quant' is JSON nested"):
        load_checkpoint(path)


def test_brackets_inside_strings_do_not_count_as_depth():
    assert json_depth(b'{"a[[[{{": "]]]}}\\"[[[", "b": [1, [2]]}') == 3
    assert json_depth(b'"unterminated [[[ \\') == 0


def test_huge_comfy_quant_payload_is_refused_before_it_is_read(tmp_path):
    size = MAX_LAYER_ENTRY_BYTES + 1
    fp8 = torch.ones(16, 16).to(torch.float8_e4m3fn)
    path = write_tensors(
        tmp_path / "big.safetensors",
        {
            "a.weight": fp8,
            "a.weight_scale": torch.tensor(1.0),
            "a.comfy_quant": torch.full((size,), 32, dtype=torch.uint8),
        },
    )
    with pytest.raises(CheckpointError, match=rf"big\.safetensors: 'a\.comfy_quant' is torch\.uint8 of {size} bytes"):
        load_checkpoint(path)


def test_a_million_empty_tensors_are_refused_quickly(tmp_path):
    entries = ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(1_000_000))
    path = write_raw(tmp_path / "many.safetensors", ("{" + entries + "}").encode())
    start = time.monotonic()
    with within(20), pytest.raises(CheckpointError, match=rf"many\.safetensors: .*{MAX_TENSORS} tensors"):
        read_header(path)
    assert time.monotonic() - start < 10


def test_oversized_header_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 101 * 2**20) + b"{" + b" " * 16)
    with pytest.raises(CheckpointError, match=r"huge\.safetensors: header is over the 100 MiB limit"):
        read_header(path)


@pytest.mark.parametrize(
    ("entry", "what"),
    [
        ({"dtype": "F32", "shape": [1], "data_offsets": [False, True]}, "data_offsets"),
        ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, "shape"),
    ],
)
def test_booleans_are_not_numbers_in_a_header(tmp_path, entry, what):
    path = write_raw(tmp_path / "bool.safetensors", {"t": entry}, b"\0" * 4)
    with pytest.raises(CheckpointError, match=rf"bool\.safetensors: tensor 't' has (an )?invalid {what}"):
        read_header(path)


def test_lone_surrogate_tensor_name_is_a_checkpoint_error(tmp_path):
    header = b'{"bad\\ud800name": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    path = write_raw(tmp_path / "sur.safetensors", header, b"\0" * 4)
    with pytest.raises(CheckpointError, match=r"sur\.safetensors: tensor name .*lone surrogate") as caught:
        load_checkpoint(path)
    str(caught.value).encode("utf-8")  # printable


def test_convert_errors_name_the_tensor(tmp_path, capsys):
    source = write_tensors(
        tmp_path / "odd.safetensors",
        {
            "a.weight": torch.randn(16, 16),
            "empty.weight": torch.zeros(0, 16),
            "e8.weight": torch.ones(4, 4).to(torch.float8_e8m0fnu),
        },
    )
    assert main(["convert", str(source), str(tmp_path / "out.safetensors")]) == 0
    header = read_header(tmp_path / "out.safetensors")
    assert header.tensors["empty.weight"].dtype == torch.float32  # kept as it was
    assert header.tensors["e8.weight"].dtype == torch.float8_e8m0fnu
    assert header.tensors["a.weight"].dtype == torch.float8_e4m3fn


def test_safe_open_failures_are_checkpoint_errors(tmp_path, monkeypatch):
    """A file that changes between its header check and its read: safetensors' own error becomes a CheckpointError."""
    path = fp8_file(tmp_path / "race.safetensors")
    from fp8_quant.formats import safe_io

    def broken(*args, **kwargs):
        raise safe_io.SafetensorError("simulated")

    monkeypatch.setattr(safe_io, "safe_open", broken)
    for read in (inspect_checkpoint, read_input_scales):
        with pytest.raises(CheckpointError, match=r"race\.safetensors: could not read tensor data"):
            read(path)


def test_a_name_with_a_nul_byte_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_header("bad\0name.safetensors")


def test_convert_names_the_tensor_torch_fails_on_and_the_file_safetensors_fails_on(tmp_path, monkeypatch, capsys):
    from fp8_quant.formats import safe_io, writer

    source = write_tensors(tmp_path / "src.safetensors", {"a.weight": torch.randn(16, 16)})

    def torch_fails(*args, **kwargs):
        raise RuntimeError("amax(): Expected reduction dim 0 to have non-zero size.")

    monkeypatch.setattr(writer, "quantize_weight", torch_fails)
    assert main(["convert", str(source), str(tmp_path / "o.safetensors")]) == 2
    assert "src.safetensors: tensor 'a.weight' could not be quantized (amax()" in capsys.readouterr().err

    def safetensors_fails(*args, **kwargs):
        raise safe_io.SafetensorError("simulated")

    monkeypatch.setattr(safe_io, "safe_open", safetensors_fails)
    assert main(["convert", str(source), str(tmp_path / "o2.safetensors")]) == 2
    assert "src.safetensors: could not read tensor data (simulated)" in capsys.readouterr().err
