"""``python -m fp8_quant sensitivity``: fit a text encoder the CLI can build (a BERT-family folder) and show where
fp8 hurts: the per-layer table, and a PNG of each layer's error with the layers kept in bf16 marked."""

from __future__ import annotations

from pathlib import Path

from .bert import WordPieceTokenizer, load_bert
from .prompts import CALIBRATION_PROMPTS
from .report import Fp8Report
from .sensitivity import require_matplotlib
from .text_encoder import quantize_text_encoder

MODEL_FILES = ("config.json", "vocab.txt", "model.safetensors")


def run_sensitivity(folder: str, recipe: str, budget: float, prompts_file: str | None) -> Fp8Report:
    """Quantize the encoder of ``folder`` by ``recipe`` on the prompts (one a line in ``prompts_file``, else the
    built-in ones); the report carries the per-layer sensitivity (``report.sensitivity.plot`` draws it)."""
    path = check_folder(folder)
    prompts = list(CALIBRATION_PROMPTS)
    if prompts_file is not None:
        prompts = [line.strip() for line in Path(prompts_file).read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"{prompts_file}: no prompts in it")
    model = load_bert(path, pooled=True)
    tokenizer = WordPieceTokenizer(path / "vocab.txt")
    report = quantize_text_encoder(model, [tokenizer([prompt]) for prompt in prompts], recipe=recipe, budget=budget)
    assert report.sensitivity is not None  # both recipes measure it
    return report


def check_folder(folder: str) -> Path:
    path = Path(folder)
    if not path.exists():
        raise ValueError(f"{folder}: no such folder (expected a BERT folder: {', '.join(MODEL_FILES)})")
    if not path.is_dir():
        raise ValueError(f"{folder}: not a folder (expected a BERT folder: {', '.join(MODEL_FILES)})")
    missing = [name for name in MODEL_FILES if not (path / name).is_file()]
    if missing:
        raise ValueError(f"{folder}: missing {', '.join(missing)} (a BERT folder holds {', '.join(MODEL_FILES)})")
    return path


def check_plot_possible() -> None:
    """Before minutes of fitting: the plot needs matplotlib, which the pack does not require."""
    require_matplotlib("--plot", ", or pass --plot none")
