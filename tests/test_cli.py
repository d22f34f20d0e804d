"""The command line's failures: one line naming the file and the cause, exit status 2, no traceback, and never a
partial or silently replaced output."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import struct
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from checkpoints import source_weights
from safetensors.torch import save_file

from fp8_quant.__main__ import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def bf16_file(tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file({key: value.to(torch.bfloat16) for key, value in source_weights().items()}, str(path))
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """Exit status and stderr of one command."""
    status = main(list(argv))
    return status, capsys.readouterr().err


def assert_one_line_error(err: str, *named: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and all(name in lines[0] for name in named), err


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.endswith(".partial"))


def test_output_in_a_missing_folder(capsys, bf16_file, tmp_path):
    output = tmp_path / "no" / "such" / "out.safetensors"
    status, err = run_cli(capsys, "convert", str(bf16_file), str(output))
    assert status == 2
    assert_one_line_error(err, str(output), "does not exist")
    assert ".partial" not in err


def test_output_that_is_a_folder(capsys, bf16_file, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    status, err = run_cli(capsys, "convert", str(bf16_file), str(folder))
    assert status == 2
    assert_one_line_error(err, str(folder), "is a directory")
    assert list(folder.iterdir()) == []


def test_device_cuda_without_cuda(capsys, bf16_file, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    output = tmp_path / "out.safetensors"
    status, err = run_cli(capsys, "convert", str(bf16_file), str(output), "--device", "cuda")
    assert status == 2
    assert_one_line_error(err, str(bf16_file), "--device cuda", "--device cpu")
    assert not output.exists()
    status, err = run_cli(capsys, "demo", "--device", "cuda")
    assert status == 2
    assert_one_line_error(err, "--device cuda")


def test_unknown_device_name(capsys, bf16_file, tmp_path):
    status, err = run_cli(capsys, "convert", str(bf16_file), str(tmp_path / "out.safetensors"), "--device", "gpu0")
    assert status == 2
    assert_one_line_error(err, "'gpu0'", "not a device name")


@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_a_folder_as_input_is_called_a_folder(capsys, tmp_path, command):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    extra = [str(tmp_path / "out.safetensors")] if command == "convert" else []
    status, err = run_cli(capsys, command, str(folder), *extra)
    assert status == 2
    assert_one_line_error(err, str(folder), "is a directory")
    assert "no such file" not in err


def test_nan_weight_names_the_file_and_the_tensor(capsys, tmp_path):
    weights = {key: value.to(torch.bfloat16) for key, value in source_weights().items()}
    weights["blocks.0.attn.k.weight"][3, 5] = float("nan")
    source = tmp_path / "nan.safetensors"
    save_file(weights, str(source))
    output = tmp_path / "out.safetensors"
    status, err = run_cli(capsys, "convert", str(source), str(output))
    assert status == 2
    assert_one_line_error(err, str(source), "blocks.0.attn.k.weight", "NaN")
    assert not output.exists() and leftovers(tmp_path) == []


def test_existing_output_needs_force(capsys, bf16_file, tmp_path):
    output = tmp_path / "out.safetensors"
    output.write_bytes(b"precious")
    status, err = run_cli(capsys, "convert", str(bf16_file), str(output))
    assert status == 2
    assert_one_line_error(err, str(output), "--force")
    assert output.read_bytes() == b"precious"
    assert main(["convert", str(bf16_file), str(output), "--force"]) == 0
    assert output.read_bytes() != b"precious"


# Runs the command in a child process that signals itself while quantizing the second weight, with the partial
# file open (the child exits 99 if it is not): deterministic, and a broken handler ends the child, not pytest.
SIGNAL_ITSELF = """
import os, signal, sys
# A shell's background job starts with SIGINT ignored, and Python then installs no KeyboardInterrupt for it: the
# child takes a terminal's default, as a person pressing Ctrl-C has it.
signal.signal(signal.SIGINT, signal.default_int_handler)
import fp8_quant.formats.writer as writer
from fp8_quant.__main__ import main

signum, output, argv = int(sys.argv[1]), sys.argv[3], sys.argv[2:]
quantize, calls = writer.quantize_weight, []

def quantize_then_signal(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        folder, name = os.path.split(output)
        if not any(f.startswith("." + name) and f.endswith(".partial") for f in os.listdir(folder)):
            sys.exit(99)
        os.kill(os.getpid(), signum)
    return quantize(*args, **kwargs)

writer.quantize_weight = quantize_then_signal
sys.exit(main(["convert", *argv]))
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_convert_leaves_no_partial_file(bf16_file, tmp_path, signum):
    output = tmp_path / "out.safetensors"
    done = subprocess.run(
        [sys.executable, "-c", SIGNAL_ITSELF, str(int(signum)), str(bf16_file), str(output)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 128 + signum, (done.returncode, done.stderr[-2000:])
    assert_one_line_error(done.stderr, str(output), signal.Signals(signum).name)
    assert not output.exists() and leftovers(tmp_path) == []


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bar_only_on_a_terminal(bf16_file, tmp_path, monkeypatch, terminal):
    stderr = FakeTerminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    assert main(["convert", str(bf16_file), str(tmp_path / "out.safetensors")]) == 0
    assert ("convert [" in stderr.getvalue()) == terminal


def test_fp8_quant_command_runs_from_any_folder(tmp_path):
    """``pip install .`` (or ``-e .``) gives the ``fp8-quant`` command; it must not need the checkout as its folder."""
    scripts = {entry.name: entry.value for entry in metadata.entry_points(group="console_scripts")}
    if "fp8-quant" not in scripts:
        pytest.skip("the pack is not installed here (pip install -e .): no fp8-quant command to run")
    assert scripts["fp8-quant"] == "fp8_quant.__main__:main"
    command = Path(sys.executable).with_name("fp8-quant")
    done = subprocess.run(
        [str(command), "demo", "--width", "64", "--depth", "1", "--device", "cpu"],
        cwd=tmp_path,
        env={key: value for key, value in os.environ.items() if key != "PYTHONPATH"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "relative error vs fp32" in done.stdout, done.stderr[-2000:]


def test_inspect_a_file_whose_every_scale_is_nan(capsys, tmp_path):
    """The file the troubleshooting section sends users to inspect: described, not a crash."""
    path = tmp_path / "nan.safetensors"
    weight = torch.randn(32, 32).to(torch.float8_e4m3fn)
    save_file({"blocks.0.q.weight": weight, "blocks.0.q.weight_scale": torch.tensor(float("nan"))}, str(path))
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "min -, max -" in out and "NaN 1" in out and "warning: 1 scale tensor(s) hold NaN" in out


def test_a_header_entry_with_a_non_string_dtype(capsys, tmp_path):
    header = json.dumps({"a.weight": {"dtype": ["BF16"], "shape": [2], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "bad_dtype.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    status, err = run_cli(capsys, "inspect", str(path))
    assert status == 2
    assert_one_line_error(err, str(path), "'a.weight'", "unsupported dtype")


@pytest.mark.parametrize(
    ("scales", "named"),
    [
        ({"something.else": 0.01}, "none of the 1 calibrated input scales names a quantized layer"),
        ({"blocks.0.attn.q": True}, "expected a JSON object"),
    ],
)
def test_calibration_that_fits_nothing_is_refused(capsys, bf16_file, tmp_path, scales, named):
    calibration = tmp_path / "scales.json"
    calibration.write_text(json.dumps(scales))
    output = tmp_path / "out.safetensors"
    status, err = run_cli(capsys, "convert", str(bf16_file), str(output), "--calibrated", str(calibration))
    assert status == 2
    assert_one_line_error(err, named)
    assert not output.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("argv", [["--width", "0"], ["--depth", "-1"], ["--width", "x"]])
def test_demo_sizes_must_be_positive(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "is not a positive integer" in err or "invalid" in err
    assert "Traceback" not in err


def test_an_unforeseen_error_is_one_line(capsys, bf16_file, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr("fp8_quant.__main__.inspect_checkpoint", broken)
    status, err = run_cli(capsys, "inspect", str(bf16_file))
    assert status == 2
    assert_one_line_error(err, str(bf16_file), "KeyError", "-v")


def test_unknown_weight_dtype_names_the_option(capsys, bf16_file, tmp_path):
    output = str(tmp_path / "out.safetensors")
    status, err = run_cli(capsys, "convert", str(bf16_file), output, "--weight-dtype", "int8")
    assert status == 2
    assert_one_line_error(err, "--weight-dtype", "'int8'", "float8_e4m3fn", "float8_e5m2")
    assert "weight_dtype" not in err  # the option, not the Python field
    assert not (tmp_path / "out.safetensors").exists()


def test_sensitivity_of_a_missing_folder_says_it_is_missing(capsys, tmp_path):
    status, err = run_cli(capsys, "sensitivity", str(tmp_path / "nope"), "--plot", "none")
    assert status == 2
    assert_one_line_error(err, "nope", "no such folder")


def test_sensitivity_names_the_missing_files(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    status, err = run_cli(capsys, "sensitivity", str(tmp_path), "--plot", "none")
    assert status == 2
    assert_one_line_error(err, "missing vocab.txt, model.safetensors")


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_is_a_whole_sentence(capsys):
    text = _help(capsys)
    assert "(also" not in text and "``" not in text  # not a docstring's first line cut off
    for command in ("demo", "inspect", "convert", "sensitivity"):
        assert command in text


@pytest.mark.parametrize("command", ["demo", "inspect", "convert", "sensitivity"])
def test_every_option_has_help_and_its_default(capsys, command):
    """Each option line of ``--help`` carries a description; each option with a value default shows it."""
    parser_actions = {
        action.dest: action
        for action in main.__globals__["_parser"]()._subparsers._group_actions[0].choices[command]._actions
    }
    text = _help(capsys, command)
    for dest, action in parser_actions.items():
        assert action.help, f"{command} {dest}: no help"
        shown = isinstance(action.default, (int, float, str)) and not isinstance(action.default, bool)
        if shown and action.default != argparse.SUPPRESS:
            assert f"(default: {action.default})" in " ".join(text.split()), f"{command} {dest}: default not shown"


def test_cli_defaults_are_the_cores():
    """The CLI takes its defaults from the core's signatures and constants, so the two cannot drift apart."""
    import inspect as pyinspect

    from fp8_quant import text_encoder
    from fp8_quant.formats import convert_checkpoint

    commands = main.__globals__["_parser"]()._subparsers._group_actions[0].choices
    defaults = {action.dest: action.default for action in commands["sensitivity"]._actions}
    assert defaults["budget"] == text_encoder.DEFAULT_BUDGET
    assert defaults["recipe"] == pyinspect.signature(text_encoder.quantize_text_encoder).parameters["recipe"].default
    convert = {action.dest: action.default for action in commands["convert"]._actions}
    signature = pyinspect.signature(convert_checkpoint).parameters
    assert convert["format"] == signature["output_format"].default
    assert torch.float8_e4m3fn == signature["weight_dtype"].default
    assert convert["weight_dtype"] == "float8_e4m3fn"
