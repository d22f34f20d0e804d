"""Group-wise Hadamard rotation: ComfyUI's ConvRot convention, computed fast and in float32.

Why rotate: a row of a DiT's activations (or weights) with a few outlier channels rounds badly to 8-bit integers
with one scale per row, because the outliers set the scale and every quiet value gets few levels. An orthogonal
rotation spreads each outlier over its whole group, so a rotated row is close to Gaussian and int8 rounds it with
about 0.9% relative RMS error. Rotating both operands by the same orthogonal ``H`` leaves the product unchanged:
``x @ W.T == (x @ H) @ (W @ H).T`` because ``H @ H.T = I``.

The convention (ComfyUI 0.30 ``int8_tensorwise`` with ``convrot``, comfy-kitchen 0.2.26), in our words:

- The input axis ``K`` (the last axis of both the activation ``x [M, K]`` and the weight ``W [N, K]``) is cut into
  consecutive groups of ``g`` values (``convrot_groupsize``, 256 by default); ``g`` must divide ``K``.
- Each group is multiplied on the right by one ``g x g`` matrix ``H``: a *regular* Hadamard matrix (every row sums
  to the same value), not the Sylvester/Walsh one. It is the Kronecker power of the 4x4 regular Hadamard matrix
  ``H4 = [[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]]`` (so ``g`` is a power of 4: 4, 16, 64,
  256, 1024, ...), divided by ``sqrt(g)`` so that it is orthonormal. ``H4`` is symmetric, so ``H`` is symmetric and
  its own inverse: rotating twice gives the input back, and un-rotating a weight is the same operation.
- Weights are stored rotated (``W_rot = W @ H`` per group, then rounded); activations are rotated the same way at
  every call before they are rounded.

A Sylvester-based fast Walsh-Hadamard transform would give other values (the matrices differ by a permutation
and signs), so a file's weights would not match: this module computes exactly ``x @ kron(H4, ..., H4) / sqrt(g)``.
It does so fast by the Kronecker structure: a group of ``g = a * b`` values viewed as an ``a x b`` matrix ``X``
(row-major) maps to ``Ha @ X @ Hb`` with ``Ha``, ``Hb`` the smaller Kronecker powers, so a group of 256 costs two
16 x 16 products (64 multiply-adds per value) instead of one 256 x 256 (512). The math runs in float32 whatever
the input dtype (ComfyUI rotates in the activation's dtype; float32 keeps the rotation's rounding far below int8's).
"""

from __future__ import annotations

import functools

import torch

DEFAULT_GROUP = 256
_H4 = ((1.0, 1.0, 1.0, -1.0), (1.0, 1.0, -1.0, 1.0), (1.0, -1.0, 1.0, 1.0), (-1.0, 1.0, 1.0, 1.0))


def group_size_problem(group: int, in_features: int | None = None) -> str | None:
    """Why ``group`` cannot rotate a layer with ``in_features`` inputs (``None``: it can)."""
    if isinstance(group, bool) or not isinstance(group, int) or group < 4 or not _is_power_of_four(group):
        return f"a rotation group must be a power of 4 (16, 64, 256, 1024, ...), got {group!r}"
    if in_features is not None and in_features % group:
        return f"rotation group {group} does not divide the layer's {in_features} input features"
    return None


def check_group_size(group: int, in_features: int | None = None, what: str = "rotation") -> int:
    """``group`` if it can rotate a layer with ``in_features`` inputs, else a ``ValueError`` naming ``what``."""
    problem = group_size_problem(group, in_features)
    if problem is not None:
        raise ValueError(f"{what}: {problem}")
    return group


def largest_group(in_features: int, preferred: int = DEFAULT_GROUP) -> int | None:
    """The largest power-of-4 group of at most ``preferred`` values (and at least 16) that divides ``in_features``;
    ``None`` where none does (an odd width: the layer is then not rotated)."""
    group = preferred
    while group >= 16:
        if in_features % group == 0:
            return group
        group //= 4
    return None


def _is_power_of_four(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0 and (value.bit_length() - 1) % 2 == 0


@functools.cache
def _factor(size: int, device_type: str, index: int | None) -> torch.Tensor:
    """``kron(H4, ..., H4) / sqrt(size)`` for ``size`` a power of 4, float32, on the device (cached: a few KB)."""
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    h4 = torch.tensor(_H4, dtype=torch.float64)
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < size:
        matrix = torch.kron(matrix, h4)
    return (matrix / size**0.5).to(device=device, dtype=torch.float32)


def _split(group: int) -> tuple[int, int]:
    """``group = a * b`` with ``a`` and ``b`` powers of 4, ``a >= b``, as close to square as they get."""
    digits = (group.bit_length() - 1) // 2
    rows = 4 ** ((digits + 1) // 2)
    return rows, group // rows


def rotate(x: torch.Tensor, group: int) -> torch.Tensor:
    """``x [..., K]`` with each group of ``group`` consecutive values along ``K`` multiplied by the orthonormal
    regular Hadamard matrix (see the module docstring), in float32; returns float32 of ``x``'s shape.

    The same call rotates an activation (before rounding it) and a weight ``[N, K]`` (before rounding it, or after
    dequantizing it to turn it back: the matrix is its own inverse)."""
    check_group_size(group, x.shape[-1])
    rows, cols = _split(group)
    device = x.device
    left = _factor(rows, device.type, device.index)
    right = _factor(cols, device.type, device.index)
    grouped = x.float().reshape(*x.shape[:-1], x.shape[-1] // group, rows, cols)
    return torch.matmul(torch.matmul(left, grouped), right).reshape(x.shape)
