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


def to_blocked(matrix: torch.Tensor) -> torch.Tensor:
    """cuBLAS's swizzled layout of block scales, written as ComfyUI's kitchen writes it (view/permute, not the byte
    formula the reader uses): 128x4 tiles, rows within a tile interleaved in four groups of 32."""
    rows, cols = matrix.shape
    n_row_blocks, n_col_blocks = -(-rows // 128), -(-cols // 4)
    padded = torch.zeros(n_row_blocks * 128, n_col_blocks * 4, dtype=matrix.dtype)
    padded[:rows, :cols] = matrix
    blocks = padded.view(n_row_blocks, 128, n_col_blocks, 4).permute(0, 2, 1, 3)
    return blocks.reshape(-1, 4, 32, 4).transpose(1, 2).reshape(n_row_blocks * 128, n_col_blocks * 4)


def quantize_mxfp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ComfyUI's mxfp8 quantization: pad to 32, one power-of-two scale per 32 inputs (rounded up so nothing
    clips). Returns (fp8 weight padded, stored e8m0 scale swizzled, float32 scales [rows, K/32])."""
    rows, cols = weight.shape
    padded = torch.nn.functional.pad(weight.float(), (0, -cols % 32, 0, -rows % 32))
    groups = padded.view(padded.shape[0], -1, 32)
    amax = groups.abs().amax(-1)
    exponent = torch.ceil(torch.log2(torch.clamp(amax / 448, min=2**-127))).to(torch.int32) + 127
    exponent = torch.where(amax == 0, torch.zeros_like(exponent), exponent.clamp(0, 254))
    scale = torch.where(exponent == 0, torch.ones_like(amax), torch.exp2(exponent.float() - 127))
    data = (groups / scale[..., None]).clamp(-448, 448).reshape(padded.shape).to(torch.float8_e4m3fn)
    stored = to_blocked(exponent.to(torch.uint8)).view(torch.float8_e8m0fnu)
    return data, stored, scale


def write_mxfp8(path: Path, source: dict[str, torch.Tensor], prefix: str = "", scale_as_uint8: bool = False) -> Path:
    """A comfy-quant file whose LAYERS are ``mxfp8`` (and the rest bf16), as ComfyUI 0.30 saves one."""
    tensors: dict[str, torch.Tensor] = {}
    entry = torch.tensor(list(json.dumps({"format": "mxfp8"}).encode()), dtype=torch.uint8)
    for key, value in source.items():
        layer = key.removesuffix(".weight")
        if not key.endswith(".weight") or layer not in LAYERS:
            tensors[prefix + key] = value.to(torch.bfloat16)
            continue
        data, stored, _ = quantize_mxfp8(value)
        tensors[prefix + key] = data
        tensors[f"{prefix}{layer}.weight_scale"] = stored.view(torch.uint8) if scale_as_uint8 else stored
        tensors[f"{prefix}{layer}.comfy_quant"] = entry.clone()
    save_file(tensors, str(path))
    return path
