"""``inspect``: what a checkpoint holds and whether its scales are healthy, for people and for tests."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import torch

from ..fp8_utils import invalid_scale_mask
from .comfy_formats import MXFP8, REFUSED_FORMATS, decode_mx_scale
from .reader import read_layer_formats, scan_checkpoint
from .safe_io import open_tensors
from .scan import CheckpointScan, LayerInfo


def inspect_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Dialect, prefix, layer counts by dtype, bytes fp8 vs the rest, and scale statistics (reads scales only)."""
    scan = scan_checkpoint(path)
    layer_formats = read_layer_formats(scan)
    dtype_counts = Counter(str(layer.weight.dtype).removeprefix("torch.") for layer in scan.layers.values())
    fp8_bytes = sum(layer.nbytes for layer in scan.fp8_layers)
    total = sum(info.nbytes for info in scan.header.tensors.values())
    result: dict[str, Any] = {
        "file": str(scan.path),
        "dialect": str(scan.dialect),
        "prefix": scan.prefix,
        "tensors": len(scan.header.tensors),
        "weights_by_dtype": dict(sorted(dtype_counts.items())),
        "fp8_layers": len(scan.fp8_layers),
        "fp8_bytes": fp8_bytes,
        "other_bytes": total - fp8_bytes,
        "granularity": dict(Counter(layer.granularity or "none" for layer in scan.fp8_layers)),
        "input_scales": sum(layer.input_scale is not None for layer in scan.fp8_layers),
        "int8_layers": dict(Counter(f"rotated in groups of {layer.rotation_group}" if layer.rotation_group else
                                    "not rotated" for layer in scan.int8_layers)),
        "formats": dict(Counter(layer_formats.values())),  # ComfyUI's per-layer formats
        "weights": scan.weight_schemes(),
        "blocks": _block_shapes(scan),
        "warnings": list(scan.warnings),
    }
    not_read = Counter(fmt for fmt in layer_formats.values() if fmt in REFUSED_FORMATS)
    if not_read:
        result["warnings"].append(
            f"layers in formats that are not FP8 nor int8 ({dict(not_read)}): ComfyUI's own loader reads this file, "
            "not this pack"
        )
    result.update(_scale_health(scan, result["warnings"]))
    return result


def _block_shapes(scan: CheckpointScan) -> dict[str, dict[str, Any]]:
    """Per block granularity: how many layers, how their scale is stored, and the range of its shapes."""
    blocks: dict[str, dict[str, Any]] = {}
    for layer in scan.fp8_layers:
        group = layer.weight_group
        if group is None or not group.is_block() or layer.weight_scale is None:
            continue
        scale = layer.weight_scale
        stored = "e8m0, swizzled" if layer.layer_format == MXFP8 else str(scale.dtype).removeprefix("torch.")
        entry = blocks.setdefault(
            group.describe(), {"layers": 0, "scale": f"{layer.scale_names[0]} ({stored})", "shapes": set()}
        )
        entry["layers"] += 1
        entry["shapes"].add(tuple(scale.shape))
    for entry in blocks.values():
        shapes = sorted(entry.pop("shapes"))
        entry["scale_shapes"] = [list(shapes[0]), list(shapes[-1])]
    return blocks


def _scale_values(handle, layer: LayerInfo, stored: str) -> tuple[torch.Tensor, int]:
    """A stored scale's values as float32 (mxfp8's e8m0 bytes decoded), and how many all-zero mxfp8 groups it
    marks (scale byte 0: a group of zeros, not a bad scale)."""
    tensor = handle.get_tensor(f"{layer.name}.{stored}")
    if layer.layer_format != MXFP8 or stored != "weight_scale":
        return tensor.float().flatten(), 0
    scale, exponents = decode_mx_scale(tensor, *layer.weight.shape)
    return scale.flatten(), int((exponents == 0).sum())


def _scale_health(scan: CheckpointScan, warnings: list[str]) -> dict[str, Any]:
    entries = [(layer, stored) for layer in scan.layers.values() for stored in layer.scale_names]
    if not entries:
        return {"scales": 0}
    values = []
    bad: list[str] = []
    zero_groups = 0
    with open_tensors(scan.path) as handle:
        for layer, stored in entries:
            scale, zeros = _scale_values(handle, layer, stored)
            zero_groups += zeros
            if bool(invalid_scale_mask(scale).any()):
                bad.append(f"{layer.name}.{stored}")
            values.append(scale)
    flat = torch.cat(values)
    finite = flat[torch.isfinite(flat)]
    health = {
        "scales": len(entries),
        "scale_min": finite.min().item() if finite.numel() else None,
        "scale_max": finite.max().item() if finite.numel() else None,
        "scale_nan": int(torch.isnan(flat).sum()),
        "scale_inf": int(torch.isinf(flat).sum()),
        "scale_nonpositive": int((flat <= 0).sum()),
        "mxfp8_zero_groups": zero_groups,
    }
    if bad:
        shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        warnings.append(f"{len(bad)} scale tensor(s) hold NaN/inf/zero/negative values: {shown}")
    return health


def _number(value: float | None) -> str:
    """A scale statistic; ``-`` where no scale value was finite (a file whose every scale is NaN or inf)."""
    return "-" if value is None else f"{value:.3g}"


def format_inspection(result: dict[str, Any]) -> str:
    mib = 2**20
    formats = f", formats {result['formats']}" if result["formats"] else ""
    lines = [
        f"file: {result['file']}",
        f"dialect: {result['dialect']}   key prefix: {result['prefix'] or '(none)'}   tensors: {result['tensors']}",
        "weights by dtype: " + ", ".join(f"{k} {v}" for k, v in result["weights_by_dtype"].items()),
        f"fp8 layers: {result['fp8_layers']} (granularity {result['granularity'] or '-'}, "
        f"{result['input_scales']} with input scales{formats})",
        "fp8 weights: " + (", ".join(f"{scheme} {count}" for scheme, count in result["weights"].items()) or "-"),
        f"bytes: fp8 layers {result['fp8_bytes'] / mib:.1f} MiB, the rest {result['other_bytes'] / mib:.1f} MiB",
    ]
    for block, entry in result["blocks"].items():
        first, last = entry["scale_shapes"]
        shapes = str(first) if first == last else f"{first} .. {last}"
        lines.append(f"blocks: {block} in {entry['layers']} layers, scales {entry['scale']} {shapes}")
    if result.get("scales"):
        low, high = (_number(result[key]) for key in ("scale_min", "scale_max"))
        lines.append(
            f"scales: {result['scales']} tensors, min {low}, max {high} (finite values), "
            f"NaN {result['scale_nan']}, inf {result['scale_inf']}, <=0 {result['scale_nonpositive']}"
            + (f", mxfp8 all-zero groups {result['mxfp8_zero_groups']}" if result["mxfp8_zero_groups"] else "")
        )
    lines += [f"warning: {warning}" for warning in result["warnings"]]
    return "\n".join(lines)
