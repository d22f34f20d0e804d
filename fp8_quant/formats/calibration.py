"""Calibrated input scales for an offline ``convert --calibrated FILE``.

Activation scales are learnt by running the model (``auto_scales``), which an offline convert cannot do. So a
calibrated convert takes them from a run that already happened: ``FILE`` is an FP8 checkpoint that carries input
scales (any dialect: what Save FP8 Model writes after a sampling step, or a vLLM/ComfyUI file with static scales),
or a JSON object ``{"layer name": scale}``. Layer names are matched without the files' key prefixes. A convert then
writes each of its fp8 layers with that layer's calibrated scale; layers it has none for stay dynamic.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .dialects import SCALE_ALIASES
from .header import CheckpointError
from .reader import scan_checkpoint
from .safe_io import MAX_SCALES_JSON_BYTES, loads_bounded, open_tensors, read_bounded


def read_input_scales(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Layer name (no key prefix) -> float32 scalar input scale, from a checkpoint or a JSON file; every scale is
    checked (finite, > 0) and a file with none is an error naming it."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        scales = _from_json(path)
    else:
        scales = _from_checkpoint(path)
    if not scales:
        raise CheckpointError(f"{path}: holds no input scales to calibrate with (run a sampling step and save first)")
    for name, scale in scales.items():
        value = scale.item()
        if not (math.isfinite(value) and value > 0):
            raise CheckpointError(f"{path}: input scale of {name!r} is {value}; it must be finite and > 0")
    return scales


def _from_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    scan = scan_checkpoint(path)
    layers = [layer for layer in scan.layers.values() if layer.input_scale is not None]
    scales: dict[str, torch.Tensor] = {}
    with open_tensors(path) as handle:
        for layer in layers:
            stored = next(name for name in layer.scale_names if SCALE_ALIASES.get(name, name) == "input_scale")
            scales[scan.short_name(layer.name)] = handle.get_tensor(f"{layer.name}.{stored}").float().reshape(())
    return scales


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # JSON true is not a scale of 1


def _from_json(path: Path) -> dict[str, torch.Tensor]:
    raw = read_bounded(path, MAX_SCALES_JSON_BYTES)  # a regular file only: a FIFO or /dev/zero is refused by name
    entries = loads_bounded(raw, f"{path}: input scales", MAX_SCALES_JSON_BYTES)
    if not isinstance(entries, dict) or not all(_is_number(value) for value in entries.values()):
        raise CheckpointError(f"{path}: expected a JSON object {{layer name: input scale}}")
    return {str(name): torch.tensor(float(value)) for name, value in entries.items()}
