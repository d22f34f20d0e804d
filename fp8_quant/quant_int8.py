"""8-bit integer rounding of weights and activations, optionally after a group-wise Hadamard rotation (``rotation``).

One numerics contract for every int8 kernel, GPU or CPU, and for the files ComfyUI 0.30 writes
(``int8_tensorwise``):

- symmetric, ``real ~= q * scale`` with ``q`` an int8 in [-127, 127] and ``scale = amax / 127`` (float32); values
  are divided by the scale, rounded half to even and clamped (ComfyUI's clamp is [-128, 127], but ``amax / 127``
  never reaches -128, so the two agree);
- weights ``W [N, K]``: one scale per output channel (``[N]``) or one per tensor (``[]``), computed once at load;
  with a rotation, of ``W @ H`` per group (stored rotated);
- activations ``x [M, K]``: one scale per row (token), computed at every call (dynamic); with a rotation, of
  ``x @ H`` per group, the same ``H`` as the weight's, so ``x @ W.T == (x @ H) @ (W @ H).T``;
- or, finer (``scale_group``: ComfyUI has no file form for it), one scale per row *and* per ``scale_group``
  consecutive inputs on both operands: activation scales ``[M, K / g]``, weight scales ``[N, K / g]``, and the
  product sums each group's exact int32 dot times its two scales. A rotated row is close to Gaussian, and the
  |max| of 256 Gaussian values is smaller than that of a few thousand, so every value gets finer steps.

An all-zero row gets a tiny positive scale (``AMAX_FLOOR / 127``) instead of 0, so nothing divides by zero and
every scale stays positive, as the rest of the pack checks.
"""

from __future__ import annotations

import torch

from .fp8_utils import AMAX_FLOOR
from .rotation import rotate

INT8_MAX = 127.0


def round_to_int8(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``values / scale`` rounded half to even and clamped to [-127, 127], as int8 (float32 math)."""
    return torch.round(values.float() / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)


def int8_scale(amax: torch.Tensor) -> torch.Tensor:
    return amax.float().clamp(min=AMAX_FLOOR) / INT8_MAX


def group_amax(values: torch.Tensor, scale_group: int) -> torch.Tensor:
    """``|values|``'s max over each run of ``scale_group`` consecutive values of the last axis: ``[..., K / g]``."""
    *lead, width = values.shape
    if width % scale_group:
        raise ValueError(f"scale group {scale_group} does not divide the {width} inputs")
    return values.abs().reshape(*lead, width // scale_group, scale_group).amax(dim=-1)


def spread_group_scale(scale: torch.Tensor, width: int) -> torch.Tensor:
    """Group scales ``[..., K / g]`` repeated over their groups: ``[..., K]``, to divide or multiply values by."""
    return scale.repeat_interleave(width // scale.shape[-1], dim=-1)


def rotated(values: torch.Tensor, group: int | None) -> torch.Tensor:
    """``values`` in float32, rotated per ``group`` inputs where a group is given."""
    return rotate(values, group) if group is not None else values.float()


def quantize_int8_rows(
    x: torch.Tensor, group: int | None = None, scale_group: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations ``[M, K]`` -> (int8 ``[M, K]``, float32 scales ``[M, 1]``, or ``[M, K / scale_group]`` with
    ``scale_group``), rotated first where ``group`` says."""
    values = rotated(x, group)
    if scale_group is None:
        scale = int8_scale(values.abs().amax(dim=-1, keepdim=True))
        return round_to_int8(values, scale), scale
    scale = int8_scale(group_amax(values, scale_group))
    return round_to_int8(values, spread_group_scale(scale, values.shape[-1])), scale


def quantize_int8_weight(
    weight: torch.Tensor, per_channel: bool = True, group: int | None = None, scale_group: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight ``[N, K]`` (real values) -> (int8 ``[N, K]``, float32 scale ``[N]`` or ``[]``, or ``[N, K / g]``
    with ``scale_group``), rotated first where ``group`` is given (the stored weight is then ``W @ H`` per group)."""
    values = rotated(weight, group)
    if scale_group is not None:
        scale = int8_scale(group_amax(values, scale_group))
        return round_to_int8(values, spread_group_scale(scale, values.shape[-1])), scale
    amax = values.abs().amax(dim=1) if per_channel else values.abs().amax()
    scale = int8_scale(amax)
    return round_to_int8(values, scale[:, None] if per_channel else scale), scale


def _weight_scale_values(scale: torch.Tensor, width: int) -> torch.Tensor:
    """A weight scale ``[]``, ``[N]`` or ``[N, K / g]`` as something ``[N, K]`` values divide or multiply by."""
    scale = scale.float()
    if scale.dim() == 2:
        return spread_group_scale(scale, width)
    return scale[:, None] if scale.dim() == 1 else scale


def quantize_int8_with_scale(weight: torch.Tensor, scale: torch.Tensor, group: int | None = None) -> torch.Tensor:
    """Real values rounded with a given (stored) scale ``[N]``, ``[]`` or ``[N, K / g]``: values past its range
    saturate."""
    values = rotated(weight, group)
    return round_to_int8(values, _weight_scale_values(scale.to(values.device), values.shape[-1]))


def dequantize_int8_weight(
    weight: torch.Tensor, scale: torch.Tensor, group: int | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The real values of an int8 weight ``[N, K]`` (turned back from the rotation where ``group`` is given), in
    ``dtype``. The rotation is its own inverse, so un-rotating is the same call as rotating."""
    scale = scale.to(weight.device, torch.float32)
    values = weight.float() * _weight_scale_values(scale, weight.shape[-1])
    return rotated(values, group).to(dtype)
