"""Write small safetensors files in each FP8 dialect (the layouts fp8_quant/formats/dialects.py describes).

These writers are deliberately independent of ``fp8_quant.formats.writer`` so that reader tests do not
just check the pack against itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from fp8_quant.fp8_utils import quantize_weight
from fp8_quant.scheme import PER_CHANNEL, PER_TENSOR, GroupShape

LAYERS = {"blocks.0.attn.q": (64, 32), "blocks.0.attn.k": (64, 32), "blocks.0.ffn.0": (128, 64)}


def source_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out_features, in_features) in LAYERS.items():
        weight = torch.randn(out_features, in_features, generator=generator)
        weight *= torch.logspace(-2, 1, out_features)[:, None]  # per-channel scales matter
        tensors[f"{name}.weight"] = weight
        tensors[f"{name}.bias"] = torch.randn(out_features, generator=generator)
    tensors["blocks.0.norm.weight"] = torch.ones(32)
    tensors["head.weight"] = torch.randn(16, 64, generator=generator)
    return tensors


def write_dialect(
    path: Path,
    dialect: str,
    source: dict[str, torch.Tensor],
    prefix: str = "",
    group: GroupShape = PER_TENSOR,
    static: bool = False,
    scale_shape: str = "scalar",
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    metadata_only: bool = False,
) -> Path:
    """``dialect``: weight-scale, comfy-scaled, comfy-quant, plain-fp8 or high-precision."""
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    quant_layers: dict[str, dict] = {}
    for key, value in source.items():
        layer = key.removesuffix(".weight")
        if not key.endswith(".weight") or layer not in LAYERS or dialect == "high-precision":
            tensors[prefix + key] = value.to(torch.bfloat16)
            continue
        if dialect == "plain-fp8":
            tensors[prefix + key] = value.clamp(-448, 448).to(fp8_dtype)
            continue
        fp8_weight, scale = quantize_weight(value, fp8_dtype, group)
        if group == PER_CHANNEL and scale_shape == "column":
            scale = scale.reshape(-1, 1)
        elif group == PER_TENSOR and scale_shape == "one":
            scale = scale.reshape(1)
        tensors[prefix + key] = fp8_weight
        scale_name, input_name = (
            ("scale_weight", "scale_input") if dialect == "comfy-scaled" else ("weight_scale", "input_scale")
        )
        tensors[f"{prefix}{layer}.{scale_name}"] = scale.float()
        if static:
            tensors[f"{prefix}{layer}.{input_name}"] = torch.tensor(0.02)
        if dialect == "comfy-quant":
            entry = {"format": "float8_e4m3fn" if fp8_dtype == torch.float8_e4m3fn else "float8_e5m2"}
            if metadata_only:
                quant_layers[layer] = entry
            else:
                tensors[f"{prefix}{layer}.comfy_quant"] = torch.tensor(
                    list(json.dumps(entry).encode()), dtype=torch.uint8
                )
    if dialect == "comfy-scaled":
        tensors[prefix + "scaled_fp8"] = torch.empty(0, dtype=fp8_dtype)
    if quant_layers:
        metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": quant_layers})
    save_file(tensors, str(path), metadata=metadata or None)
    return path
