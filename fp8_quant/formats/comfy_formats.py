"""The per-layer formats of ComfyUI's ``.comfy_quant`` files: which are FP8 and how their scales are stored, the
int8 one this pack reads too, and those it leaves to ComfyUI's own loader (with an error that says so).

``int8_tensorwise`` (ComfyUI 0.30): an int8 weight ``[N, K]`` and a float32 ``weight_scale``, ``[]`` per tensor or
``[N, 1]`` per output channel; with ``"convrot": true`` (at the top of the layer's JSON entry, or under its
``"params"``) the weight is stored rotated by the group-wise Hadamard matrix of ``rotation``, in groups of
``"convrot_groupsize"`` inputs (256 when not given). ComfyUI rounds activations per row at every call; no input
scale is stored. ``int8_rotation_group`` reads that entry.

``mxfp8`` (ComfyUI 0.30 writes it): e4m3 weights padded to ``[roundup(N, 32), roundup(K, 32)]``, one power-of-two
scale per 32 inputs of a row as an e8m0 byte (``2**(E - 127)``; 0 marks an all-zero group), stored in cuBLAS's
swizzled 128x4-tile layout ``[roundup(N, 128), roundup(K/32, 4)]``: inside a tile, element ``(r, c)`` sits at byte
``(r % 32) * 16 + (r // 32) * 4 + c``, and the 512-byte tiles follow row block by row block. The reader turns them
into this pack's canonical form: the fp8 weight and float32 scales ``[N, K/32]`` (``scheme.MX_BLOCK``), exactly.
"""

from __future__ import annotations

import torch

from ..rotation import group_size_problem

FLOAT8_FORMATS: dict[str, torch.dtype] = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
MXFP8 = "mxfp8"
FP8_FORMATS = (*FLOAT8_FORMATS, MXFP8)
INT8_TENSORWISE = "int8_tensorwise"
# Layer formats whose name says more than the weight's dtype and its scales' granularity (mxfp8: e8m0 scales).
NAMED_LAYER_FORMATS = (MXFP8,)
# ComfyUI's formats that are not FP8 (4-bit floats, int8 and rotated int4/int8).
NON_FP8_FORMATS = ("nvfp4", INT8_TENSORWISE, "convrot_w4a4")
# Those this pack does not read (ComfyUI's own loader does): 4-bit weights.
REFUSED_FORMATS = ("nvfp4", "convrot_w4a4")
DEFAULT_CONVROT_GROUP = 256
MX_GROUP = 32
MX_SCALE_DTYPES: tuple[torch.dtype, ...] = (torch.uint8, torch.float8_e8m0fnu)
_E8M0_BIAS = 127


def int8_rotation_group(entry: dict, where: str) -> int | None:
    """The ConvRot group of an ``int8_tensorwise`` layer's JSON entry (``None``: not rotated), read where ComfyUI
    reads it (the top level first, then ``params``); a value ComfyUI could not run is a ``ValueError`` naming
    ``where``."""
    params = entry.get("params")
    params = params if isinstance(params, dict) else {}
    convrot = entry.get("convrot", params.get("convrot", False))
    if not isinstance(convrot, bool):
        raise ValueError(f"{where}: 'convrot' must be true or false, got {convrot!r}")
    if not convrot:
        return None
    group = entry.get("convrot_groupsize", params.get("convrot_groupsize", DEFAULT_CONVROT_GROUP))
    if isinstance(group, float) and group.is_integer():
        group = int(group)
    problem = group_size_problem(group)
    if problem is not None:
        raise ValueError(f"{where}: convrot_groupsize: {problem}")
    return group


def roundup(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def weight_dtype_of(fmt: str) -> torch.dtype:
    """The fp8 dtype a layer of FP8 format ``fmt`` stores its weight in."""
    return FLOAT8_FORMATS.get(fmt, torch.float8_e4m3fn)


def mx_scale_shape(rows: int, in_features: int) -> tuple[int, int]:
    """The stored (swizzled) scale shape of an mxfp8 weight with ``rows`` rows and ``in_features`` (padded) inputs."""
    return roundup(rows, 128), roundup(-(-in_features // MX_GROUP), 4)


def _swizzled_index(rows: int, groups: int, stored_cols: int, device: torch.device) -> torch.Tensor:
    """For each ``(r, c)`` of a ``[rows, groups]`` scale matrix, its byte in the swizzled layout."""
    r = torch.arange(rows, device=device)[:, None]
    c = torch.arange(groups, device=device)[None, :]
    tile = (r // 128) * (stored_cols // 4) + c // 4
    return tile * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4


def unswizzle_mx_scale(stored: torch.Tensor, rows: int, groups: int) -> torch.Tensor:
    """The e8m0 exponents ``[rows, groups]`` (uint8) of a swizzled mxfp8 scale."""
    flat = stored.reshape(-1).view(torch.uint8)
    return flat[_swizzled_index(rows, groups, stored.shape[-1], stored.device)]


def swizzle_mx_scale(exponents: torch.Tensor) -> torch.Tensor:
    """e8m0 exponents ``[rows, groups]`` (uint8) in the swizzled layout ComfyUI stores (the inverse of
    ``unswizzle_mx_scale``)."""
    rows, groups = exponents.shape
    stored_rows, stored_cols = roundup(rows, 128), roundup(groups, 4)
    flat = torch.zeros(stored_rows * stored_cols, dtype=torch.uint8, device=exponents.device)
    flat[_swizzled_index(rows, groups, stored_cols, exponents.device)] = exponents.to(torch.uint8)
    return flat.view(stored_rows, stored_cols)


def decode_mx_scale(stored: torch.Tensor, rows: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A stored (swizzled e8m0) mxfp8 scale of a weight with ``rows`` rows and ``in_features`` (padded) inputs as
    float32 group scales ``[rows, in_features / MX_GROUP]`` (``mx_scale_to_float``), with the e8m0 exponents they
    come from (0: an all-zero group)."""
    exponents = unswizzle_mx_scale(stored, rows, in_features // MX_GROUP)
    return mx_scale_to_float(exponents), exponents


def mx_scale_to_float(exponents: torch.Tensor) -> torch.Tensor:
    """``2**(E - 127)`` as float32; an all-zero group (E = 0) gets the smallest scale instead of 0, which changes
    nothing (its values are zero) and keeps every scale positive, as the rest of the pack checks."""
    return torch.exp2(exponents.to(torch.float32).clamp(min=1) - _E8M0_BIAS)


def is_power_of_two(scale: torch.Tensor) -> bool:
    """Whether every scale is an exact power of two (what e8m0 holds): MX tensor cores take only those."""
    mantissa, _ = torch.frexp(scale.float())
    return bool((mantissa == 0.5).all())


def crop_mx_padding(
    weight: torch.Tensor, scale: torch.Tensor, out_features: int, in_features: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """An mxfp8 weight padded to 32 (and its float32 group scales) cut to the model's ``[out, in]``; ``None`` when
    ``weight`` is not that padding of ``[out, in]`` (or there is nothing to cut)."""
    padded = (roundup(out_features, MX_GROUP), roundup(in_features, MX_GROUP))
    if padded == (out_features, in_features):
        return None
    if tuple(weight.shape) != padded or tuple(scale.shape) != (padded[0], padded[1] // MX_GROUP):
        return None
    groups = -(-in_features // MX_GROUP)
    return weight[:out_features, :in_features].contiguous(), scale[:out_features, :groups].contiguous()
