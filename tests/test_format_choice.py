"""``quant_format`` ``auto``: the format per device, said in one sentence; a user's own choice is kept."""

from __future__ import annotations

import pytest
import torch

from fp8_quant import format_choice
from fp8_quant.config import Fp8Config, Int8Config, QuantFormat, UserOptions, online_config, parse_quant_format


def test_auto_on_a_cpu_is_int8_rotated_weight_only_and_says_why():
    options, note = format_choice.resolve_quant_format(UserOptions(quant_format="auto"), "cpu")
    assert options.format is QuantFormat.INT8_ROTATED and options.activation_scheme == "none"
    assert note == "quant_format auto: int8_rotated, weight-only (cpu has no FP8 tensor cores nor int8 ones: every " \
        "layer is dequantized, so activations stay unrounded and int8 rotated weights are the more accurate)", note
    config = online_config(options)
    assert isinstance(config, Int8Config) and not config.quantizes_activations
    assert config.rotation_group is not None  # rotated: what makes int8 weights the more accurate


def test_auto_on_a_cpu_keeps_fp8_for_a_forced_fp8_kernel():
    options, note = format_choice.resolve_quant_format(UserOptions(quant_format="auto"), "cpu", "scaled_mm_rowwise")
    assert options.format is QuantFormat.FP8 and note.endswith("; fp8 kept: kernel 'scaled_mm_rowwise' is an fp8 "
                                                               "kernel)"), note  # fmt: skip
    options, _ = format_choice.resolve_quant_format(UserOptions(quant_format="auto"), "cpu", "dequant")
    assert options.format is QuantFormat.INT8_ROTATED  # both families have a dequantize kernel


@pytest.mark.parametrize(
    ("choice", "named"),
    [
        ({"activation_scheme": "static"}, "activation_scheme 'static' rounds activations as an FP8 GPU does"),
        ({"activation_scheme": "dynamic"}, "activation_scheme 'dynamic' rounds activations as an FP8 GPU does"),
        ({"weight_granularity": "block"}, "weight_granularity 'block' has no int8 form"),
    ],
)
def test_auto_on_a_cpu_keeps_fp8_where_the_choices_ask_for_it(choice, named):
    options, note = format_choice.resolve_quant_format(UserOptions(quant_format="auto", **choice), "cpu")
    assert options.format is QuantFormat.FP8 and note.endswith(f"; fp8 kept: {named})"), note
    assert isinstance(online_config(options), Fp8Config)


@pytest.mark.parametrize(
    "choice",
    [{"activation_scheme": "none"}, {"weight_granularity": "tensor"}, {"activation_granularity": "group"},
     {"activation_granularity": "tensor"}],
)  # fmt: skip
def test_auto_on_a_cpu_takes_int8_where_the_choices_have_a_weight_only_form(choice):
    """An activation granularity means nothing where activations stay unrounded (fp8's dequantized layers ignore it
    too), so it does not keep fp8, and never makes the int8 config refuse."""
    options, _ = format_choice.resolve_quant_format(UserOptions(quant_format="auto", **choice), "cpu")
    assert options.format is QuantFormat.INT8_ROTATED and options.activation_scheme == "none"
    assert options.activation_granularity == "auto"
    config = online_config(options)
    assert isinstance(config, Int8Config) and not config.quantizes_activations


def test_a_files_own_layers_keep_their_activation_scheme():
    """``auto`` is resolved for the layers quantized on the fly only: an fp8 file's calibrated input scales and an
    int8 file's per-row activations stay as the user's options give them, with nothing said about a format."""
    from fp8_quant.choices import ActivationScheme
    from fp8_quant.dispatch import Fp8Recipe

    auto = UserOptions(quant_format="auto")
    cpu = torch.device("cpu")
    fp8_file = Fp8Recipe.for_checkpoint(Fp8Config(activation_scheme="static", activation_granularity="tensor"),
                                        auto, device=cpu)  # fmt: skip
    assert fp8_file.online is None and fp8_file.format_note is None
    assert fp8_file.stored.activation_scheme is ActivationScheme.STATIC
    int8_file = Fp8Recipe.for_checkpoint(None, auto, int8_layers={"blocks.0.ffn.0": 256}, device=cpu)
    assert int8_file.format_note is None
    assert int8_file._stored_int8_config(256).activation_scheme is ActivationScheme.DYNAMIC
    on_the_fly = Fp8Recipe.for_checkpoint(None, auto, device=cpu)
    assert isinstance(on_the_fly.online, Int8Config) and not on_the_fly.online.quantizes_activations
    assert on_the_fly.format_note.startswith("quant_format auto: int8_rotated, weight-only (")
    assert Fp8Recipe.for_checkpoint(None, auto).format_note is None  # no device: fp8 until one resolves it


@pytest.mark.parametrize("chosen", ["fp8", "int8_rotated"])
def test_a_chosen_format_is_kept_and_nothing_is_said(chosen):
    options, note = format_choice.resolve_quant_format(UserOptions(quant_format=chosen), "cpu")
    assert options.quant_format == chosen and note is None


@pytest.mark.parametrize(
    ("fp8_missing", "int8_missing", "expected", "weight_only"),
    [
        (None, None, QuantFormat.FP8, False),  # Ada, Hopper, Blackwell
        ("GPU capability 8.6 has no FP8 tensor cores (needs 8.9+)", None, QuantFormat.INT8_ROTATED, False),  # Ampere
        ("GPU capability 7.0 has no FP8 tensor cores (needs 8.9+)", "no int8", QuantFormat.INT8_ROTATED, True),  # Volta
    ],
)
def test_auto_follows_the_gpus_tensor_cores(monkeypatch, fp8_missing, int8_missing, expected, weight_only):
    monkeypatch.setattr(format_choice, "fp8_compute_unsupported", lambda device: fp8_missing)
    monkeypatch.setattr(format_choice, "int_mm_unsupported", lambda kind, index: int8_missing)
    options, note = format_choice.resolve_quant_format(UserOptions(quant_format="auto"), torch.device("cuda", 0))
    assert options.format is expected, note
    assert note.startswith(f"quant_format auto: {expected.value}{', weight-only' if weight_only else ''} (")
    assert (options.activation_scheme == "none") is weight_only  # rounded where a GEMM takes 8-bit activations
    assert isinstance(online_config(options), type(online_config(UserOptions(quant_format=expected.value))))


def test_auto_parses_and_without_a_device_is_fp8():
    assert parse_quant_format(" Auto ") is QuantFormat.AUTO
    assert online_config(UserOptions(quant_format="auto")).quant_format is QuantFormat.FP8
    with pytest.raises(ValueError, match=r"quant_format: 'int4' is not allowed; allowed values: \['auto', 'fp8'"):
        UserOptions(quant_format="int4")


def test_the_cpu_formats_bench_runs(tmp_path):
    """``bench/bench_cpu_formats.py`` at one tiny shape (a smoke test): auto's form is the int8 weight-only one and
    it is closer to float32 than fp8 weight-only, as the full run measures."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "cpu.json"
    subprocess.run([sys.executable, str(repo / "bench" / "bench_cpu_formats.py"), "--smoke", "--json", str(out)],
                   check=True, cwd=repo, capture_output=True, timeout=300)  # fmt: skip
    paths = json.loads(out.read_text())["rows"][0]["paths"]
    auto = paths["ours auto (int8_rotated, activation_scheme none)"]
    assert auto["rel_err"] < 0.6 * paths["ours fp8, weight-only"]["rel_err"], paths
    assert all(path["ms"] > 0 for path in paths.values())
