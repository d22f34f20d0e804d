"""Fused Triton kernels for the int8 linear (CUDA only; imported lazily by ``kernels.int8_mm``).

Why: done with torch operations, an int8 linear's activations pass through memory some ten times per call (the
rotation in float32 with its reshapes, the row amax, the division, rounding, clamp and cast) and the product's
int32 result four more times (to float32, two scale multiplications, the bias, the cast), which costs more than
the int8 GEMM saves. Here each is one kernel:

- ``quantize_rows``: two kernels over a grid of (block of rows, group of inputs), so that short calls still
  fill the GPU: the first rotates each group and folds its |max| into the row's amax (an atomic max), the second
  rotates it again and rounds it with the row's scale. The rotation is a product with the ``g x g`` Hadamard
  matrix on the tensor cores: its entries are ``+-1/sqrt(g)``, a power of two for every allowed ``g``, so
  bf16/fp16 operands hold them and the activations exactly, and with float32 accumulation the rotated values are
  those of the float32 rotation up to the order of summation. Rotating twice costs less than writing the rotated
  row out and reading it back. (One program per block of whole rows, as before, took 1.9 ms for a 28080 x 5120
  call on an H200: too few programs, each a long chain of small products.)
- ``scaled_int8_mm``: the int8 GEMM with ``acc * row_scale * column_scale + bias`` and the cast in its epilogue,
  so the int32 product never reaches memory; ``scale_bias`` does that epilogue alone after ``torch._int_mm``.

With one scale per row and rotation group (``quant_int8``'s ``scale_group``), ``quantize_groups`` is one kernel
over the same grid (a group's |max| is known inside its program, no atomic and no second launch), and
``grouped_int8_mm`` scales each K step's int32 dot by its row's and column's group scales into a float32
accumulator.

The numerics are ``quant_int8``'s: scale ``amax / 127`` with a floor, rounding half to even, clamp to [-127, 127].
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .fp8_utils import AMAX_FLOOR
from .rotation import _factor

# Rows per program: every program reads the whole g x g Hadamard matrix, so long calls take more rows per program
# (less of that traffic per row); short ones fewer (more programs to fill the GPU).
ROWS_PER_PROGRAM = 64
ROWS_PER_PROGRAM_LONG = 128
LONG_CALL_ROWS = 2048
COLUMN_CHUNK = 64  # output columns of the rotation computed per product (bounds the Hadamard tile held)
UNROTATED_GROUP = 256  # columns per program where nothing is rotated


@triton.jit
def _round_half_even(v):
    """``torch.round``'s rounding (ties to even) for |v| well inside float32's integers."""
    r = tl.floor(v + 0.5)
    odd = (r.to(tl.int32) & 1) == 1
    return tl.where((r - v == 0.5) & odd, r - 1.0, r)


@triton.jit
def _group_values(x_ptr, h_ptr, rows, row_mask, x_stride, start, c, G: tl.constexpr, C: tl.constexpr,
                  ROTATE: tl.constexpr):
    """Columns ``start + c .. + C`` of the rows, rotated within their group of ``G`` (``ROTATE``) or as they are,
    in float32."""
    if ROTATE:
        k = tl.arange(0, G)
        x = tl.load(x_ptr + rows[:, None] * x_stride + (start + k)[None, :], mask=row_mask[:, None], other=0.0)
        j = tl.arange(0, C)
        h = tl.load(h_ptr + k[:, None] * G + (c + j)[None, :])
        values = tl.dot(x, h, out_dtype=tl.float32)
    else:
        cols = start + c + tl.arange(0, C)
        values = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=row_mask[:, None], other=0.0)
        values = values.to(tl.float32)
    return values


@triton.jit
def _rotated_amax_kernel(
    x_ptr,
    h_ptr,
    amax_ptr,
    n_rows,
    x_stride,
    G: tl.constexpr,
    C: tl.constexpr,
    BM: tl.constexpr,
    ROTATE: tl.constexpr,
):
    """One program per block of rows and group of ``G`` inputs: the group's rotated |max| per row, folded into
    the row's amax (``amax_ptr``, zeroed first) by an atomic max (all values are >= 0)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_mask = rows < n_rows
    start = tl.program_id(1) * G
    amax = tl.zeros((BM,), dtype=tl.float32)
    for c in tl.static_range(0, G, C):
        values = _group_values(x_ptr, h_ptr, rows, row_mask, x_stride, start, c, G, C, ROTATE)
        amax = tl.maximum(amax, tl.max(tl.abs(values), axis=1))
    tl.atomic_max(amax_ptr + rows, amax, mask=row_mask)


@triton.jit
def _rotated_codes_kernel(
    x_ptr,
    h_ptr,
    amax_ptr,
    q_ptr,
    scale_ptr,
    n_rows,
    x_stride,
    q_stride,
    amax_floor,
    G: tl.constexpr,
    C: tl.constexpr,
    BM: tl.constexpr,
    ROTATE: tl.constexpr,
):
    """The same grid: the group rotated again, divided by the row's scale, rounded and stored as int8; the programs
    of the first group also store the scales."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_mask = rows < n_rows
    group = tl.program_id(1)
    start = group * G
    amax = tl.load(amax_ptr + rows, mask=row_mask, other=1.0)
    scale = tl.div_rn(tl.maximum(amax, amax_floor), tl.full((BM,), 127.0, tl.float32))
    if group == 0:
        tl.store(scale_ptr + rows, scale, mask=row_mask)
    for c in tl.static_range(0, G, C):
        values = _group_values(x_ptr, h_ptr, rows, row_mask, x_stride, start, c, G, C, ROTATE)
        # IEEE division (Triton's "/" is an approximate one): the same rounding as ``values / scale`` in torch.
        codes = _round_half_even(tl.div_rn(values, tl.broadcast_to(scale[:, None], values.shape)))
        codes = tl.minimum(tl.maximum(codes, -127.0), 127.0)
        cols = start + c + tl.arange(0, C)
        tl.store(q_ptr + rows[:, None] * q_stride + cols[None, :], codes.to(tl.int8), mask=row_mask[:, None])


@triton.jit
def _grouped_codes_kernel(
    x_ptr,
    h_ptr,
    q_ptr,
    scale_ptr,
    n_rows,
    x_stride,
    q_stride,
    amax_floor,
    G: tl.constexpr,
    C: tl.constexpr,
    BM: tl.constexpr,
):
    """One program per block of rows and rotation group: the group rotated, its |max| per row, then rotated again,
    divided by its own scale, rounded and stored; the scales go group-major (``scale_ptr[group, row]``), so the
    GEMM reads a tile's row scales of one group contiguously."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_mask = rows < n_rows
    group = tl.program_id(1)
    start = group * G
    amax = tl.zeros((BM,), dtype=tl.float32)
    for c in tl.static_range(0, G, C):
        values = _group_values(x_ptr, h_ptr, rows, row_mask, x_stride, start, c, G, C, True)
        amax = tl.maximum(amax, tl.max(tl.abs(values), axis=1))
    scale = tl.div_rn(tl.maximum(amax, amax_floor), tl.full((BM,), 127.0, tl.float32))
    tl.store(scale_ptr + group * n_rows + rows, scale, mask=row_mask)
    for c in tl.static_range(0, G, C):
        values = _group_values(x_ptr, h_ptr, rows, row_mask, x_stride, start, c, G, C, True)
        codes = _round_half_even(tl.div_rn(values, tl.broadcast_to(scale[:, None], values.shape)))
        codes = tl.minimum(tl.maximum(codes, -127.0), 127.0)
        cols = start + c + tl.arange(0, C)
        tl.store(q_ptr + rows[:, None] * q_stride + cols[None, :], codes.to(tl.int8), mask=row_mask[:, None])


@triton.jit
def _scale_bias_kernel(
    acc_ptr,
    row_scale_ptr,
    col_scale_ptr,
    bias_ptr,
    out_ptr,
    n_rows,
    n_cols,
    acc_stride,
    out_stride,
    PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    acc = tl.load(acc_ptr + rows[:, None] * acc_stride + cols[None, :], mask=mask, other=0).to(tl.float32)
    row_scale = tl.load(row_scale_ptr + rows, mask=rows < n_rows, other=0.0)
    if PER_CHANNEL:
        col_scale = tl.load(col_scale_ptr + cols, mask=cols < n_cols, other=0.0)
        out = acc * row_scale[:, None] * col_scale[None, :]
    else:
        out = acc * row_scale[:, None] * tl.load(col_scale_ptr)
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * out_stride + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def supports_quantize(x: torch.Tensor, group: int | None) -> bool:
    """Whether ``quantize_rows`` takes ``x``: a CUDA bf16/fp16 matrix with unit column stride, rotated in groups of
    16 to 256 (a tile of the Hadamard matrix fits the kernel) or not at all, ``K`` a multiple of 64."""
    return (
        x.is_cuda
        and x.dim() == 2
        and x.dtype in (torch.bfloat16, torch.float16)
        and x.stride(1) == 1
        and x.shape[1] % COLUMN_CHUNK == 0
        and (group is None or group in (64, 256))
    )


@functools.cache
def _hadamard(group: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The ``group x group`` rotation matrix in the activations' dtype (its entries are exact there)."""
    return _factor(group, device.type, device.index).to(dtype).contiguous()


def quantize_rows(x: torch.Tensor, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` (see ``supports_quantize``) -> (int8 codes ``[M, K]``, float32 row scales ``[M, 1]``)."""
    rows, cols = x.shape
    codes = torch.empty((rows, cols), dtype=torch.int8, device=x.device)
    scales = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows == 0:
        return codes, scales
    g = group if group is not None else UNROTATED_GROUP
    if cols % g:
        g = COLUMN_CHUNK  # unrotated widths that are multiples of 64 only
    h = _hadamard(g, x.dtype, x.device) if group is not None else x  # unused without a rotation
    amax = torch.zeros((rows,), dtype=torch.float32, device=x.device)
    long_call = rows >= LONG_CALL_ROWS
    block = ROWS_PER_PROGRAM_LONG if long_call else ROWS_PER_PROGRAM
    warps = 8 if long_call else 4
    grid = (triton.cdiv(rows, block), cols // g)
    common = {"G": g, "C": min(COLUMN_CHUNK, g), "BM": block, "ROTATE": group is not None}
    _rotated_amax_kernel[grid](x, h, amax, rows, x.stride(0), **common, num_warps=warps, num_stages=1)
    _rotated_codes_kernel[grid](
        x, h, amax, codes, scales, rows, x.stride(0), codes.stride(0), AMAX_FLOOR, **common, num_warps=warps,
        num_stages=1,
    )
    return codes, scales


def supports_grouped(x: torch.Tensor, group: int | None, scale_group: int) -> bool:
    """Whether ``quantize_groups`` takes ``x``: as ``supports_quantize``, rotated, with one scale per rotation
    group."""
    return group is not None and scale_group == group and supports_quantize(x, group)


def quantize_groups(x: torch.Tensor, group: int, scale_group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` (see ``supports_grouped``) -> (int8 codes ``[M, K]``, float32 scales ``[M, K / g]``, a
    transposed view of a group-major buffer: ``grouped_int8_mm`` reads it as it is)."""
    rows, cols = x.shape
    codes = torch.empty((rows, cols), dtype=torch.int8, device=x.device)
    scales = torch.empty((cols // scale_group, rows), dtype=torch.float32, device=x.device)
    if rows == 0:
        return codes, scales.t()
    long_call = rows >= LONG_CALL_ROWS
    block = ROWS_PER_PROGRAM_LONG if long_call else ROWS_PER_PROGRAM
    grid = (triton.cdiv(rows, block), cols // group)
    _grouped_codes_kernel[grid](
        x, _hadamard(group, x.dtype, x.device), codes, scales, rows, x.stride(0), codes.stride(0), AMAX_FLOOR,
        G=group, C=min(COLUMN_CHUNK, group), BM=block, num_warps=8 if long_call else 4, num_stages=1,
    )
    return codes, scales.t()


def scale_bias(
    acc: torch.Tensor,
    row_scale: torch.Tensor,
    column_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``(acc * row_scale * column_scale + bias).to(out_dtype)`` for an int32 ``acc [M, N]`` in one pass;
    ``column_scale``: ``[N]``/``[1, N]`` or a scalar, float32."""
    rows, cols = acc.shape
    out = torch.empty((rows, cols), dtype=out_dtype, device=acc.device)
    if rows == 0:
        return out
    column = column_scale.reshape(-1).float().contiguous()
    per_channel = column.numel() > 1
    bias_arg = bias.contiguous() if bias is not None else column
    block_m, block_n = 64, 128
    grid = (triton.cdiv(rows, block_m), triton.cdiv(cols, block_n))
    _scale_bias_kernel[grid](
        acc,
        row_scale.reshape(-1).contiguous(),
        column,
        bias_arg,
        out,
        rows,
        cols,
        acc.stride(0),
        out.stride(0),
        PER_CHANNEL=per_channel,
        HAS_BIAS=bias is not None,
        BM=block_m,
        BN=block_n,
        num_warps=4,
    )
    return out


# The int8 GEMM with the scales, bias and cast in its epilogue: the int32 product never reaches memory. Tile
# shapes measured on an H200 (bench/bench_int8_gemm.py); a few are tried per problem size by Triton's autotuner.
_GEMM_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP": 8}, num_stages=stages, num_warps=warps)
    for bm, bn, bk, stages, warps in (
        (128, 128, 128, 4, 8),
        (128, 256, 128, 3, 8),
        (256, 128, 128, 3, 8),
        (128, 128, 64, 5, 4),
        (64, 128, 128, 4, 4),
    )
]


def _gemm_rows_bucket(rows: int) -> int:
    """Calls of similar row counts share a tuned tile (a sampling run changes rows only with the batch)."""
    return 1 << max(4, (rows - 1).bit_length())


@triton.jit
def _scaled_int8_mm_kernel(
    a_ptr,
    w_ptr,
    row_scale_ptr,
    col_scale_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    M_BUCKET,
    a_stride,
    w_stride,
    out_stride,
    PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP: tl.constexpr,
):
    # Grouped tile order: GROUP row-tiles walk the columns together, so the weight tiles they read stay in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    per_group = GROUP * tiles_n
    first_m = (pid // per_group) * GROUP
    group_rows = min(tiles_m - first_m, GROUP)
    tile_m = first_m + (pid % per_group) % group_rows
    tile_n = (pid % per_group) // group_rows
    rows = tile_m * BM + tl.arange(0, BM)
    cols = tile_n * BN + tl.arange(0, BN)
    k = tl.arange(0, BK)
    a_rows = tl.where(rows < M, rows, 0)  # clamped, not masked: every load stays in bounds, stores are masked
    w_cols = tl.where(cols < N, cols, 0)
    a_tile = a_ptr + a_rows[:, None] * a_stride + k[None, :]
    w_tile = w_ptr + w_cols[None, :] * w_stride + k[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for start in range(0, K, BK):
        a = tl.load(a_tile, mask=(start + k)[None, :] < K, other=0)
        w = tl.load(w_tile, mask=(start + k)[:, None] < K, other=0)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        a_tile += BK
        w_tile += BK
    row_mask = rows < M
    col_mask = cols < N
    row_scale = tl.load(row_scale_ptr + rows, mask=row_mask, other=0.0)
    out = acc.to(tl.float32) * row_scale[:, None]
    if PER_CHANNEL:
        out = out * tl.load(col_scale_ptr + cols, mask=col_mask, other=0.0)[None, :]
    else:
        out = out * tl.load(col_scale_ptr)
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    tl.store(out_ptr + rows[:, None] * out_stride + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


_scaled_int8_mm_tuned = triton.autotune(configs=_GEMM_CONFIGS, key=["M_BUCKET", "N", "K"])(_scaled_int8_mm_kernel)
# Triton's interpreter (CPU tests) has no device to time tiles on: it runs the first tile shape.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "") == "1"


def supports_scaled_mm(a: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``scaled_int8_mm`` takes these operands: CUDA int8 ``a [M, K]`` and ``weight [N, K]``, both with
    unit column stride, ``K`` a multiple of 16 (the product's smallest tile)."""
    return (
        a.is_cuda
        and a.dtype == torch.int8
        and weight.dtype == torch.int8
        and a.dim() == 2
        and weight.dim() == 2
        and a.shape[1] == weight.shape[1]
        and a.stride(1) == 1
        and weight.stride(1) == 1
        and a.shape[1] % 16 == 0
    )


def scaled_int8_mm(
    a: torch.Tensor,
    weight: torch.Tensor,
    row_scale: torch.Tensor,
    column_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``((a @ weight.T) * row_scale * column_scale + bias).to(out_dtype)``: the exact int32 product of int8
    ``a [M, K]`` and ``weight [N, K]`` scaled in float32 as ``scale_bias`` does, in one kernel."""
    rows, inner = a.shape
    cols = weight.shape[0]
    out = torch.empty((rows, cols), dtype=out_dtype, device=a.device)
    if rows == 0:
        return out
    column = column_scale.reshape(-1).float().contiguous()
    bias_arg = bias.contiguous() if bias is not None else column

    def grid(meta):
        return (triton.cdiv(rows, meta["BM"]) * triton.cdiv(cols, meta["BN"]),)

    config = _GEMM_CONFIGS[0]
    launch = (
        functools.partial(_scaled_int8_mm_kernel[grid], **config.kwargs, num_warps=config.num_warps)
        if _INTERPRETED
        else _scaled_int8_mm_tuned[grid]
    )
    launch(
        a,
        weight,
        row_scale.reshape(-1).contiguous(),
        column,
        bias_arg,
        out,
        rows,
        cols,
        inner,
        _gemm_rows_bucket(rows),
        a.stride(0),
        weight.stride(0),
        out.stride(0),
        PER_CHANNEL=column.numel() > 1,
        HAS_BIAS=bias is not None,
    )
    return out


# Group scales: K steps no longer than the scale group (a step's dot is scaled by one group's scales).
_GROUPED_CONFIGS = {
    group: [
        triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP": 8}, num_stages=stages, num_warps=warps)
        for bm, bn, bk, stages, warps in shapes
        if bk <= group
    ]
    for group, shapes in {
        256: (
            (128, 128, 128, 4, 8),
            (128, 256, 128, 3, 8),
            (128, 128, 256, 3, 8),
            (256, 128, 128, 3, 8),
            (64, 128, 128, 4, 4),
        ),
        64: ((128, 128, 64, 4, 8), (128, 256, 64, 4, 8), (64, 128, 64, 4, 4)),
    }.items()
}


@triton.jit
def _grouped_int8_mm_kernel(
    a_ptr,
    w_ptr,
    a_scale_ptr,
    w_scale_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    M_BUCKET,
    a_stride,
    w_stride,
    out_stride,
    a_scale_row_stride,
    a_scale_group_stride,
    w_scale_row_stride,
    w_scale_group_stride,
    HAS_BIAS: tl.constexpr,
    G: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP: tl.constexpr,
):
    # The same tile order and clamped loads as ``_scaled_int8_mm_kernel``; ``K`` is a multiple of ``G`` and ``BK``
    # divides ``G``, so every step lies inside one scale group and needs no mask.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    per_group = GROUP * tiles_n
    first_m = (pid // per_group) * GROUP
    group_rows = min(tiles_m - first_m, GROUP)
    tile_m = first_m + (pid % per_group) % group_rows
    tile_n = (pid % per_group) // group_rows
    rows = tile_m * BM + tl.arange(0, BM)
    cols = tile_n * BN + tl.arange(0, BN)
    k = tl.arange(0, BK)
    a_rows = tl.where(rows < M, rows, 0)
    w_cols = tl.where(cols < N, cols, 0)
    a_tile = a_ptr + a_rows[:, None] * a_stride + k[None, :]
    w_tile = w_ptr + w_cols[None, :] * w_stride + k[:, None]
    a_scales = a_scale_ptr + a_rows * a_scale_row_stride
    w_scales = w_scale_ptr + w_cols * w_scale_row_stride
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for start in range(0, K, BK):
        part = tl.dot(tl.load(a_tile), tl.load(w_tile), out_dtype=tl.int32)
        group = start // G
        a_scale = tl.load(a_scales + group * a_scale_group_stride)
        w_scale = tl.load(w_scales + group * w_scale_group_stride)
        acc += part.to(tl.float32) * a_scale[:, None] * w_scale[None, :]
        a_tile += BK
        w_tile += BK
    row_mask = rows < M
    col_mask = cols < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    tl.store(out_ptr + rows[:, None] * out_stride + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


_grouped_int8_mm_tuned = {
    group: triton.autotune(configs=configs, key=["M_BUCKET", "N", "K"])(_grouped_int8_mm_kernel)
    for group, configs in _GROUPED_CONFIGS.items()
}


def grouped_int8_mm(
    a: torch.Tensor,
    weight: torch.Tensor,
    row_scale: torch.Tensor,
    weight_scale: torch.Tensor,
    scale_group: int,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``sum over groups g of (a_g @ weight_g.T) * row_scale[:, g] * weight_scale[:, g]`` plus ``bias``, cast to
    ``out_dtype``: int8 ``a [M, K]`` and ``weight [N, K]`` (``supports_scaled_mm``), float32 group scales
    ``[M, K / g]`` and ``[N, K / g]`` of any strides, ``g`` 64 or 256."""
    rows, inner = a.shape
    cols = weight.shape[0]
    out = torch.empty((rows, cols), dtype=out_dtype, device=a.device)
    if rows == 0:
        return out
    if scale_group not in _GROUPED_CONFIGS or inner % scale_group:
        raise ValueError(f"grouped int8 GEMM: scale group {scale_group} for {inner} inputs is not supported")
    weight_scale = weight_scale.float()
    row_scale = row_scale.float()
    bias_arg = bias.contiguous() if bias is not None else weight_scale

    def grid(meta):
        return (triton.cdiv(rows, meta["BM"]) * triton.cdiv(cols, meta["BN"]),)

    if _INTERPRETED:
        config = _GROUPED_CONFIGS[scale_group][0]
        launch = functools.partial(_grouped_int8_mm_kernel[grid], **config.kwargs, num_warps=config.num_warps)
    else:
        launch = _grouped_int8_mm_tuned[scale_group][grid]
    launch(
        a,
        weight,
        row_scale,
        weight_scale,
        bias_arg,
        out,
        rows,
        cols,
        inner,
        _gemm_rows_bucket(rows),
        a.stride(0),
        weight.stride(0),
        out.stride(0),
        row_scale.stride(0),
        row_scale.stride(1),
        weight_scale.stride(0),
        weight_scale.stride(1),
        HAS_BIAS=bias is not None,
        G=scale_group,
    )
    return out
