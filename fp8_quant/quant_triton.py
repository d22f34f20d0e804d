"""Fused Triton kernels for activation quantization (CUDA only; imported lazily by ``quant_fp8``).

One program per row: pass 1 reads the row for its amax, pass 2 reads it again (from L2) and writes fp8.
For the row lengths of DiTs and text encoders (K <= 16384) the whole row fits in one block, so both passes
read registers and the kernel moves each input byte once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_utils import AMAX_FLOOR, fp8_max

_ONE_BLOCK_MAX = 16384


@triton.jit
def _quant_rows_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    static_scale_ptr,
    n_cols,
    x_row_stride,
    q_row_stride,
    amax_ptr,
    fp8_limit,
    amax_floor,
    STATIC: tl.constexpr,
    TRACK_AMAX: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    q_row = q_ptr + row * q_row_stride
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        mask = cols < n_cols
        values = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if STATIC:
            scale = tl.load(static_scale_ptr).to(tl.float32)
            if TRACK_AMAX:  # the range this call really had: the next call's static scale follows it
                tl.atomic_max(amax_ptr, tl.max(tl.abs(values), axis=0))
        else:
            scale = tl.maximum(tl.max(tl.abs(values), axis=0), amax_floor) / fp8_limit
            tl.store(scale_ptr + row, scale)
        quantized = tl.clamp(values / scale, -fp8_limit, fp8_limit)
        tl.store(q_row + cols, quantized.to(q_ptr.dtype.element_ty), mask=mask)
    else:
        if STATIC:
            scale = tl.load(static_scale_ptr).to(tl.float32)
            if TRACK_AMAX:
                running = tl.zeros([BLOCK], dtype=tl.float32)
                for start in range(0, n_cols, BLOCK):
                    mask = start + cols < n_cols
                    values = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                    running = tl.maximum(running, tl.abs(values))
                tl.atomic_max(amax_ptr, tl.max(running, axis=0))
        else:
            running = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                mask = start + cols < n_cols
                values = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                running = tl.maximum(running, tl.abs(values))
            scale = tl.maximum(tl.max(running, axis=0), amax_floor) / fp8_limit
            tl.store(scale_ptr + row, scale)
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            values = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            quantized = tl.clamp(values / scale, -fp8_limit, fp8_limit)
            tl.store(q_row + start + cols, quantized.to(q_ptr.dtype.element_ty), mask=mask)


def _launch(
    x2d: torch.Tensor, dtype: torch.dtype, static_scale: torch.Tensor | None, amax_out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = x2d.shape
    quantized = torch.empty((rows, cols), dtype=dtype, device=x2d.device)
    row_scales = torch.empty((rows, 1), dtype=torch.float32, device=x2d.device)
    one_block = cols <= _ONE_BLOCK_MAX
    block = triton.next_power_of_2(cols) if one_block else 4096
    num_warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    _quant_rows_kernel[(rows,)](
        x2d,
        quantized,
        row_scales,
        static_scale if static_scale is not None else row_scales,
        cols,
        x2d.stride(0),
        quantized.stride(0),
        amax_out if amax_out is not None else row_scales,
        fp8_max(dtype),
        AMAX_FLOOR,
        STATIC=static_scale is not None,
        TRACK_AMAX=amax_out is not None,
        ONE_BLOCK=one_block,
        BLOCK=block,
        num_warps=num_warps,
    )
    return quantized, row_scales


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    x2d = x.reshape(-1, x.shape[-1])
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()


def quantize_dynamic_triton(x: torch.Tensor, dtype: torch.dtype, per_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x2d = _as_rows(x)
    if per_token:
        quantized, row_scales = _launch(x2d, dtype, None)
        return quantized.view(x.shape), row_scales.view(*x.shape[:-1], 1)
    # Per tensor: the row pass gives every row's amax for free; the tensor scale is their maximum.
    _, row_scales = _launch(x2d, dtype, None)
    scale = row_scales.max()
    quantized, _ = _launch(x2d, dtype, scale.reshape(1))
    return quantized.view(x.shape), scale


def quantize_static_triton(
    x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, amax_out: torch.Tensor | None = None
) -> torch.Tensor:
    """One pass with a fixed scale; with ``amax_out`` (float32, one element, on x's device) the pass also raises it
    to the tensor's amax, for scales that follow the activations (``calibration``)."""
    x2d = _as_rows(x)
    quantized, _ = _launch(x2d, dtype, scale.to(device=x.device, dtype=torch.float32).reshape(1), amax_out)
    return quantized.view(x.shape)
