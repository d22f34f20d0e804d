"""Hostile inputs: pathological skip patterns, planted links and failed writes, control characters in names."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import source_weights
from safetensors.torch import save_file

from fp8_quant import UserOptions, is_layer_skipped
from fp8_quant.__main__ import main
from fp8_quant.formats import CheckpointError, convert_checkpoint, read_header

REPO = Path(__file__).resolve().parents[1]
EVIL = "re:(.|a)*Z"  # exponential in re: 2**n paths on "a" * n


@pytest.fixture
def bf16_file(tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file({key: value.to(torch.bfloat16) for key, value in source_weights().items()}, str(path))
    return path


def test_pathological_regex_finishes_in_bounded_time():
    """In a child process with a timeout: with Python's re this search would run for hours, and a hang must fail."""
    code = f"import time; from fp8_quant import is_layer_skipped; t = time.time(); " \
        f"r = is_layer_skipped('a' * 3000, [{EVIL!r}]); print(r, time.time() - t)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    matched, seconds = done.stdout.split()
    assert matched == "False" and float(seconds) < 1.0, done.stdout
    assert is_layer_skipped("aaZ", [EVIL])


@pytest.mark.parametrize("pattern", [r"re:(a*)\1", r"re:(?=a)b", r"re:(?<!a)b", "re:[", "re:" + "a" * 2000])
def test_backtracking_regexes_are_refused_naming_the_option(pattern):
    with pytest.raises(ValueError, match="^skip_layers: ") as caught:
        UserOptions(skip_layers=pattern)
    assert repr(pattern)[:20] in str(caught.value) and "\n" not in str(caught.value)


def test_cli_skip_errors_name_the_option_once(capsys, bf16_file, tmp_path):
    status = main(["convert", str(bf16_file), str(tmp_path / "o.safetensors"), "--skip", "re:["])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("error: --skip: ") and "unterminated" in err[0], err
    assert err[0].count("error") == 1


def test_cli_unmatched_skip_warns(capsys, bf16_file, tmp_path):
    assert main(["convert", str(bf16_file), str(tmp_path / "o.safetensors"), "--skip", "blocks.0.atn"]) == 0
    assert "warning: --skip 'blocks.0.atn' matches no layer" in capsys.readouterr().err


def test_planted_link_at_the_temporary_name_is_not_followed(bf16_file, tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    out = tmp_path / "out" / "o.safetensors"
    out.parent.mkdir()
    (out.parent / "o.safetensors.partial").symlink_to(victim)
    names = iter(["planted", "fresh"])
    monkeypatch.setattr("tempfile._get_candidate_names", lambda: names)
    (out.parent / ".o.safetensors.planted.partial").symlink_to(victim)
    convert_checkpoint(bf16_file, out)
    assert victim.read_bytes() == b"keep" and read_header(out).tensors


@pytest.mark.parametrize("failure", [RuntimeError("boom"), KeyboardInterrupt(), OSError(errno.ENOSPC, "No space")])
def test_failed_write_leaves_the_old_target_and_no_temporary(bf16_file, tmp_path, monkeypatch, failure):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"old")
    calls = []
    real_write = os.write

    def failing_write(fd, data):
        calls.append(1)
        if len(calls) == 3:
            raise failure
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(type(failure)) as caught:
        convert_checkpoint(bf16_file, out)
    if isinstance(failure, OSError):
        assert str(out) in str(caught.value) and "partial" not in str(caught.value)
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


def test_no_clobber_writer_fails_by_name(bf16_file, tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"first")
    with pytest.raises(CheckpointError, match="already exists"):
        convert_checkpoint(bf16_file, out, overwrite=False)
    assert out.read_bytes() == b"first"


def test_control_characters_in_names_stay_on_one_line(tmp_path):
    path = tmp_path / "a\nb\x1b[31m.safetensors"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(CheckpointError) as caught:
        read_header(path)
    message = str(caught.value)
    assert "\n" not in message and "\x1b" not in message and "\\n" in message and "\\x1b" in message
    assert "not a safetensors file" in message and str(int.from_bytes(b"\x89PNG\r\n\x1a\n", "little")) not in message
