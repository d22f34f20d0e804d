"""``quant_format`` ``auto``: the format per device, said in one sentence; a user's own choice is kept."""

from __future__ import annotations

import pytest
import torch

from fp8_quant import format_choice
from fp8_quant.config import QuantFormat, UserOptions, online_config, parse_quant_format


def test_auto_on_a_cpu_is_fp8_and_says_why():
    options, note = format_choice.resolve_quant_format(UserOptions(quant_format="auto"), "cpu")
    assert options.format is QuantFormat.FP8
    assert note == "quant_format auto: fp8 (cpu has no FP8 tensor cores nor int8 ones: both formats are dequantized, " \
        "fp8 the cheaper)", note


@pytest.mark.parametrize("chosen", ["fp8", "int8_rotated"])
def test_a_chosen_format_is_kept_and_nothing_is_said(chosen):
    options, note = format_choice.resolve_quant_format(UserOptions(quant_format=chosen), "cpu")
    assert options.quant_format == chosen and note is None


@pytest.mark.parametrize(
    ("fp8_missing", "int8_missing", "expected"),
    [
        (None, None, QuantFormat.FP8),  # Ada, Hopper, Blackwell
        ("GPU capability 8.6 has no FP8 tensor cores (needs 8.9+)", None, QuantFormat.INT8_ROTATED),  # Ampere
        ("GPU capability 7.0 has no FP8 tensor cores (needs 8.9+)", "no int8", QuantFormat.FP8),  # Volta
    ],
)
def test_auto_follows_the_gpus_tensor_cores(monkeypatch, fp8_missing, int8_missing, expected):
    monkeypatch.setattr(format_choice, "fp8_compute_unsupported", lambda device: fp8_missing)
    monkeypatch.setattr(format_choice, "int_mm_unsupported", lambda kind, index: int8_missing)
    options, note = format_choice.resolve_quant_format(UserOptions(quant_format="auto"), torch.device("cuda", 0))
    assert options.format is expected, note
    assert note.startswith(f"quant_format auto: {expected.value} (")
    assert isinstance(online_config(options), type(online_config(UserOptions(quant_format=expected.value))))


def test_auto_parses_and_without_a_device_is_fp8():
    assert parse_quant_format(" Auto ") is QuantFormat.AUTO
    assert online_config(UserOptions(quant_format="auto")).quant_format is QuantFormat.FP8
    with pytest.raises(ValueError, match=r"quant_format: 'int4' is not allowed; allowed values: \['auto', 'fp8'"):
        UserOptions(quant_format="int4")
