"""Text-encoder recipes on small random encoders (CPU): error-compensating rounding, the sensitivity pass and its
byte budget, per-layer overrides through the recipe, errors that name the option or the layer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import outlier_input, rel_err
from torch import nn

from fp8_quant import clone_module_tree
from fp8_quant.calibration import output_tensors
from fp8_quant.fp8_utils import dequantize, quantize_weight
from fp8_quant.gptq import gptq_quantize
from fp8_quant.scheme import PER_CHANNEL, PER_TENSOR
from fp8_quant.text_encoder import quantize_text_encoder


class TinyEncoder(nn.Module):
    """Residual MLP blocks with a layer norm, one block's weights much louder than the others' (a sensitive layer)."""

    def __init__(self, width: int = 64, depth: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        with torch.no_grad():
            self.blocks[-1][2].weight.mul_(6.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.norm(x)


def samples(count: int = 12, tokens: int = 24, width: int = 64) -> list[dict]:
    return [{"x": outlier_input(tokens, width, seed=100 + i) / 20} for i in range(count)]


def outputs(model: nn.Module, inputs: list[dict]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**sample) for sample in inputs])


@pytest.mark.parametrize("group", [PER_CHANNEL, PER_TENSOR])
def test_gptq_keeps_the_layer_output_closer_than_plain_rounding(group):
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(96, 128, generator=generator) * torch.logspace(-1, 1, 96)[:, None]
    x = outlier_input(2048, 128, seed=4) / 20
    hessian = x.t() @ x / x.shape[0]
    codes, scale = gptq_quantize(weight, hessian, torch.float8_e4m3fn, group, damp=0.01)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == weight.shape
    assert tuple(scale.shape) == ((96,) if group is PER_CHANNEL else ())
    plain = dequantize(*quantize_weight(weight, torch.float8_e4m3fn, group), group=group)
    rounded = dequantize(codes, scale, group=group)
    reference = x @ weight.t()
    assert rel_err(x @ rounded.t(), reference) < 0.8 * rel_err(x @ plain.t(), reference)
    assert rel_err(rounded, weight) < 0.1  # still the same weight, to fp8 precision


def test_quality_recipe_beats_plain_within_the_byte_budget():
    model = TinyEncoder()
    calibration, held_out = samples(), samples(8, tokens=16)
    for sample in held_out:
        sample["x"] = sample["x"].flip(0) * 1.3
    reference = outputs(model, held_out)
    plain = clone_module_tree(model)
    quantize_text_encoder(plain, recipe="plain")
    fitted = clone_module_tree(model)
    report = quantize_text_encoder(fitted, calibration, recipe="quality", budget=0.7)
    plain_error, fitted_error = (
        rel_err(outputs(plain, held_out), reference),
        rel_err(outputs(fitted, held_out), reference),
    )
    assert fitted_error < 0.7 * plain_error, (fitted_error, plain_error)
    assert report.bytes_after <= 0.7 * report.bf16_bytes
    table = report.sensitivity
    assert {layer.name for layer in table.layers} == {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert "blocks.2.2" in table.kept  # the loud layer is among the most sensitive per byte
    kept_layer = fitted.get_submodule("blocks.2.2")
    assert kept_layer.weight.dtype == torch.bfloat16  # an fp32 model's kept layer is stored in bf16
    assert "kept in bf16 (sensitive)" in report.summary() and "quality recipe" in report.summary()
    assert "blocks.2.2" in table.table(limit=3) and "more layers, all fp8" in table.table(limit=3)


def test_input_model_keeps_its_bytes():
    model = TinyEncoder()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    copy = clone_module_tree(model)
    quantize_text_encoder(copy, samples(4), recipe="speed")
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert all(type(m) is not nn.Linear or "forward" not in m.__dict__ for m in model.modules())


def test_speed_recipe_rounds_activations_and_reports_it():
    model = TinyEncoder()
    copy = clone_module_tree(model)
    report = quantize_text_encoder(copy, samples(4), recipe="speed")
    assert report.config.activation_scheme == "dynamic" and report.config.round_activations_on_dequant
    assert rel_err(outputs(copy, samples(3)), outputs(model, samples(3))) < 0.1


def test_output_tensors_finds_nested_outputs():
    a, b = torch.ones(2), torch.zeros(3)
    assert [t.shape for t in output_tensors((a, None, {"pooled": b, "mask": torch.ones(2, dtype=torch.long)}))] == [
        (2,),
        (3,),
    ]


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"recipe": "fastest"}, "recipe"),
        ({"budget": 0.4}, "budget"),
        ({"recipe": "quality", "sample_inputs": []}, "sample_inputs"),
    ],
)
def test_bad_options_are_errors_naming_them(kwargs, named):
    kwargs = {"sample_inputs": samples(2), **kwargs}
    with pytest.raises(ValueError, match=named):
        quantize_text_encoder(TinyEncoder(), **kwargs)


def test_no_linears_and_nan_weights_are_errors_naming_them():
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_text_encoder(nn.Sequential(nn.LayerNorm(8)), [{"input": torch.randn(2, 8)}])
    model = TinyEncoder()
    with torch.no_grad():
        model.blocks[1][0].weight[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"blocks\.1\.0"):
        quantize_text_encoder(model, samples(2))


BERT_CONFIG = {
    "model_type": "bert",
    "vocab_size": 40,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}
BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "cat", "dog", "red", "the", "sun", ",", ".", "##s"]


def write_tiny_bert(folder: Path, config: dict = BERT_CONFIG, words: list[str] = BERT_WORDS) -> Path:
    from safetensors.torch import save_file

    from fp8_quant.bert import BertConfig, BertEncoder

    torch.manual_seed(0)
    model = BertEncoder(BertConfig(**{k: v for k, v in BERT_CONFIG.items() if k != "model_type"}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "vocab.txt").write_text("\n".join(words + [f"w{i}" for i in range(40 - len(words))]))
    return folder


def test_sensitivity_cli_on_a_tiny_bert_folder(tmp_path, capsys):
    from fp8_quant.__main__ import main

    write_tiny_bert(tmp_path)
    plot = tmp_path / "plot.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert main(["sensitivity", str(tmp_path), "--plot", str(plot)]) == 2
        assert "matplotlib" in capsys.readouterr().err
        return
    assert main(["sensitivity", str(tmp_path), "--plot", str(plot)]) == 0
    printed = capsys.readouterr().out
    assert "encoder.layer.1.output.dense" in printed and "quality recipe" in printed
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_sensitivity_cli_without_a_plot_needs_no_matplotlib(tmp_path, capsys, monkeypatch):
    from fp8_quant.__main__ import main

    write_tiny_bert(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert main(["sensitivity", str(tmp_path), "--plot", "none"]) == 0
    assert "encoder.layer.1.output.dense" in capsys.readouterr().out
    # Asked for a plot without matplotlib: refused before the fit, in one line.
    assert main(["sensitivity", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip().splitlines() == [
        "error: --plot needs matplotlib (pip install matplotlib), or pass --plot none"
    ]


@pytest.mark.parametrize(
    ("config", "words", "named"),
    [
        ({k: v for k, v in BERT_CONFIG.items() if k != "intermediate_size"}, BERT_WORDS, "intermediate_size"),
        (BERT_CONFIG, [w for w in BERT_WORDS if w != "[PAD]"], "[PAD]"),
    ],
)
def test_sensitivity_cli_names_what_a_bert_folder_lacks(tmp_path, capsys, config, words, named):
    from fp8_quant.__main__ import main

    write_tiny_bert(tmp_path, config, words)
    assert main(["sensitivity", str(tmp_path), "--plot", "none"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and named in err and "Traceback" not in err, err


def test_block_weights_need_the_plain_recipe():
    from fp8_quant.config import UserOptions

    model = torch.nn.Sequential(torch.nn.Linear(256, 256))
    with pytest.raises(ValueError, match="weight_granularity: 'block' needs recipe 'plain'"):
        quantize_text_encoder(model, [torch.randn(2, 256)], options=UserOptions(weight_granularity="block"))
    assert model[0].weight.dtype == torch.float32  # refused before anything was touched


def test_sensitivity_cli_refuses_a_folder_without_a_model(tmp_path, capsys):
    from fp8_quant.__main__ import main

    assert main(["sensitivity", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err


def test_recipe_overrides_decide_per_layer():
    """Per-layer choices computed for one model go through the one dispatcher: keep (stored in the keep dtype),
    another scheme, or weights rounded ahead of time."""
    from fp8_quant import Fp8Config, Fp8Recipe, prepare_model_for_fp8
    from fp8_quant.dispatch import LayerOverride

    model = TinyEncoder(width=32, depth=2)
    weight = model.blocks[1][0].weight.detach()
    codes, scale = quantize_weight(weight, torch.float8_e4m3fn, PER_CHANNEL)
    recipe = Fp8Recipe.for_model(
        Fp8Config(activation_scheme="dynamic"),
        overrides={
            "blocks.0.0": LayerOverride(keep=True, reason="kept for the test"),
            "blocks.0.2": LayerOverride(config=Fp8Config(activation_scheme="none")),
        },
        rounded={"blocks.1.0": (codes, scale)},
        keep_dtype=torch.bfloat16,
    )
    report = prepare_model_for_fp8(model, recipe)
    reasons = {layer.name: layer.reason for layer in report.layers}
    assert reasons["blocks.0.0"] == "kept for the test"
    assert model.blocks[0][0].weight.dtype == torch.bfloat16
    assert not model.blocks[0][2].fp8.method.config.quantizes_activations
    assert model.blocks[1][2].fp8.method.config.quantizes_activations
    assert torch.equal(model.blocks[1][0].weight.view(torch.uint8), codes.view(torch.uint8))
    assert model(torch.randn(3, 32)).isfinite().all()


def test_quality_recipe_logs_each_phase_and_its_layers_with_an_estimate(caplog, monkeypatch):
    """A full-size encoder's fitting takes minutes on a CPU: the log names each phase and counts layers with the
    time left, so a person sees it working (issue 24)."""
    import logging

    import fp8_quant.text_encoder as text_encoder

    monkeypatch.setattr(text_encoder._Steps, "LOG_EVERY", 2)
    model = TinyEncoder(depth=3)  # 6 linears
    with caplog.at_level(logging.INFO, logger="fp8_quant.text_encoder"):
        quantize_text_encoder(model, samples(4), recipe="quality", budget=0.7)
    lines = [r.getMessage() for r in caplog.records if r.name == "fp8_quant.text_encoder"]
    phases = [line for line in lines if "so far" in line]
    assert [p.split(":")[1].split(" on ")[0].split(",")[0].split(" (")[0].strip() for p in phases] == [
        "reference outputs and error-compensating rounding",
        "sensitivity of each layer alone in fp8",
        "output error",
    ]
    counts = [line for line in lines if "s left in this phase" in line]
    # rounding and sensitivity: every 2nd of 6 layers each
    assert [line.split(" layers,")[0].rsplit(" ", 1)[1] for line in counts] == ["2/6", "4/6", "6/6"] * 2
    assert any(line.startswith("fp8 text encoder: fitted in") for line in lines)
