"""``inspect``: what a checkpoint holds and whether its scales are healthy, for people and for tests."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import torch
from safetensors import safe_open

from ..fp8_utils import invalid_scale_mask
from .dialects import CheckpointScan
from .reader import read_layer_formats, scan_checkpoint


def inspect_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Dialect, prefix, layer counts by dtype, bytes fp8 vs the rest, and scale statistics (reads scales only)."""
    scan = scan_checkpoint(path)
    formats = read_layer_formats(scan)
    dtype_counts = Counter(str(layer.weight.dtype).removeprefix("torch.") for layer in scan.layers.values())
    fp8_bytes = sum(layer.nbytes for layer in scan.fp8_layers)
    total = sum(info.nbytes for info in scan.header.tensors.values())
    result: dict[str, Any] = {
        "file": str(scan.path),
        "dialect": scan.dialect,
        "prefix": scan.prefix,
        "tensors": len(scan.header.tensors),
        "weights_by_dtype": dict(sorted(dtype_counts.items())),
        "fp8_layers": len(scan.fp8_layers),
        "fp8_bytes": fp8_bytes,
        "other_bytes": total - fp8_bytes,
        "granularity": dict(Counter(layer.granularity or "none" for layer in scan.fp8_layers)),
        "input_scales": sum(layer.input_scale is not None for layer in scan.fp8_layers),
        "formats": dict(Counter(formats.values())),
        "warnings": list(scan.warnings),
    }
    result.update(_scale_health(scan, result["warnings"]))
    return result


def _scale_health(scan: CheckpointScan, warnings: list[str]) -> dict[str, Any]:
    keys = [f"{layer.name}.{stored}" for layer in scan.layers.values() for stored in layer.scale_names]
    if not keys:
        return {"scales": 0}
    values = []
    bad: list[str] = []
    with safe_open(str(scan.path), framework="pt", device="cpu") as handle:
        for key in keys:
            scale = handle.get_tensor(key).float().flatten()
            if bool(invalid_scale_mask(scale).any()):
                bad.append(key)
            values.append(scale)
    flat = torch.cat(values)
    finite = flat[torch.isfinite(flat)]
    health = {
        "scales": len(keys),
        "scale_min": finite.min().item() if finite.numel() else None,
        "scale_max": finite.max().item() if finite.numel() else None,
        "scale_nan": int(torch.isnan(flat).sum()),
        "scale_inf": int(torch.isinf(flat).sum()),
        "scale_nonpositive": int((flat <= 0).sum()),
    }
    if bad:
        shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        warnings.append(f"{len(bad)} scale tensor(s) hold NaN/inf/zero/negative values: {shown}")
    return health


def format_inspection(result: dict[str, Any]) -> str:
    mib = 2**20
    formats = f", formats {result['formats']}" if result["formats"] else ""
    lines = [
        f"file: {result['file']}",
        f"dialect: {result['dialect']}   key prefix: {result['prefix'] or '(none)'}   tensors: {result['tensors']}",
        "weights by dtype: " + ", ".join(f"{k} {v}" for k, v in result["weights_by_dtype"].items()),
        f"fp8 layers: {result['fp8_layers']} (granularity {result['granularity'] or '-'}, "
        f"{result['input_scales']} with input scales{formats})",
        f"bytes: fp8 layers {result['fp8_bytes'] / mib:.1f} MiB, the rest {result['other_bytes'] / mib:.1f} MiB",
    ]
    if result.get("scales"):
        lines.append(
            f"scales: {result['scales']} tensors, min {result['scale_min']:.3g}, max {result['scale_max']:.3g}, "
            f"NaN {result['scale_nan']}, inf {result['scale_inf']}, <=0 {result['scale_nonpositive']}"
        )
    lines += [f"warning: {warning}" for warning in result["warnings"]]
    return "\n".join(lines)
