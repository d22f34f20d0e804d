"""Fused Triton kernels for activation quantization (CUDA only; imported lazily by ``quant_fp8``).

One program per row (several short rows per program). For the row lengths of DiTs and text encoders (K <= 16384)
the whole row fits in one block, so the amax and the cast read registers and the kernel moves each input byte once;
longer rows take a second pass from L2. Three modes:

- dynamic: each row's scale is its own amax / fp8 max (written out per row).
- static: one given scale.
- running: the scale follows the activations without a host round trip ("delayed scaling"): it is computed from
  ``history`` (the largest amax of earlier calls) times a margin, written out for the GEMM, and every row raises
  ``next_history`` to ``max(history, its amax)``; the caller swaps the two buffers after the call, so no program
  reads a value another program of the same launch is writing. Rows that pass the scale's range raise
  ``overshoot`` (their amax over the range), so a clamped call can be reported later.

Launch cost: Triton's own launch path (argument binding, specialization, cache key) is most of what a launch costs
the host (bench/overhead.py; figures in bench/NOTES.md), and a DiT at a few thousand tokens, or a text encoder,
waits for the host at every linear. The compiled kernel is therefore kept per specialization (``_Launch.key``: what
Triton specializes on for these arguments) and launched directly. Whether this Triton's compiled kernels take the
direct call is checked once per process on a small problem against the normal launch; where not, every launch
takes the normal path. Pointers a mode does not read are passed as ``None`` (a constant to Triton): the launcher
checks every pointer it is given with a driver call. ``RowQuantizer`` is one layer's launch with what stays fixed
(mode, dtypes, row length, device) worked out once, so that a call derives only what depends on its input.
A static or running launch can also write its one scale out per row (``row_scales``): the row-wise GEMM takes an
``[M, 1]`` scale, which would otherwise cost another allocation and a copy kernel per call.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .fp8_utils import AMAX_FLOOR, fp8_max

logger = logging.getLogger(__name__)

_ONE_BLOCK_MAX = 16384
_ELEMENTS_PER_PROGRAM = 8192  # short rows are grouped so that each program moves at least this many elements
DYNAMIC, STATIC, RUNNING = 0, 1, 2


@triton.jit
def _quant_rows_kernel(
    x_ptr,
    q_ptr,
    row_scale_ptr,
    scale_ptr,
    history_ptr,
    next_history_ptr,
    overshoot_ptr,
    n_rows,
    n_cols,
    x_row_stride,
    q_row_stride,
    fp8_limit,
    amax_floor,
    margin,
    MODE: tl.constexpr,
    ROW_SCALES: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # ROWS rows per program (short rows: enough work per program); ROWS is 1 when a row needs several blocks.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    x_rows = x_ptr + rows[:, None] * x_row_stride
    q_rows = q_ptr + rows[:, None] * q_row_stride
    cols = tl.arange(0, BLOCK)[None, :]
    if ONE_BLOCK:
        mask = row_mask[:, None] & (cols < n_cols)
        values = tl.load(x_rows + cols, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(values), axis=1)
    else:
        running = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        if MODE != 1:  # static needs no amax
            for start in range(0, n_cols, BLOCK):
                part_mask = row_mask[:, None] & (start + cols < n_cols)
                part = tl.load(x_rows + start + cols, mask=part_mask, other=0.0).to(tl.float32)
                running = tl.maximum(running, tl.abs(part))
        amax = tl.max(running, axis=1)
    if MODE == 0:
        scale = tl.maximum(amax, amax_floor) / fp8_limit
        tl.store(row_scale_ptr + rows, scale, mask=row_mask)
        scale = scale[:, None]
    elif MODE == 1:
        scale = tl.load(scale_ptr).to(tl.float32)
    else:
        history = tl.load(history_ptr)
        scale = tl.maximum(history, amax_floor) * margin / fp8_limit
        if tl.program_id(0) == 0:
            tl.store(scale_ptr, scale)
        block_amax = tl.max(amax, axis=0)
        tl.atomic_max(next_history_ptr, tl.maximum(block_amax, history))
        ratio = block_amax / (scale * fp8_limit)
        tl.atomic_max(overshoot_ptr, ratio, mask=ratio > 1.0)
    if ROW_SCALES:
        if MODE != 0:  # the one scale, once per row, for a GEMM that takes [M, 1] (dynamic stored its own above)
            tl.store(row_scale_ptr + rows, tl.zeros([ROWS], dtype=tl.float32) + scale, mask=row_mask)
    if ONE_BLOCK:
        quantized = tl.clamp(values / scale, -fp8_limit, fp8_limit)
        tl.store(q_rows + cols, quantized.to(q_ptr.dtype.element_ty), mask=mask)
    else:
        for start in range(0, n_cols, BLOCK):
            part_mask = row_mask[:, None] & (start + cols < n_cols)
            part = tl.load(x_rows + start + cols, mask=part_mask, other=0.0).to(tl.float32)
            quantized = tl.clamp(part / scale, -fp8_limit, fp8_limit)
            tl.store(q_rows + start + cols, quantized.to(q_ptr.dtype.element_ty), mask=part_mask)


def _launch(
    x2d: torch.Tensor,
    dtype: torch.dtype,
    mode: int,
    scale: torch.Tensor | None = None,
    history: torch.Tensor | None = None,
    next_history: torch.Tensor | None = None,
    overshoot: torch.Tensor | None = None,
    margin: float = 1.0,
    row_scales: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One launch on ``x2d`` (rows with unit column stride): the fp8 values, and the scale of each row ``[M, 1]``
    where the mode computes one (dynamic) or ``row_scales`` asks for the given one per row."""
    rows, cols = x2d.shape
    quantized = torch.empty((rows, cols), dtype=dtype, device=x2d.device)
    row_scales = mode == DYNAMIC or row_scales
    scales_out = torch.empty((rows, 1), dtype=torch.float32, device=x2d.device) if row_scales else None
    launch = _Launch.of(x2d, quantized, scales_out, scale, history, next_history, overshoot, dtype, margin, mode)
    compiled = _direct_launches.get(launch.key)
    if compiled is not None:
        compiled[launch.grid](*launch.arguments)  # the compiled kernel on the current stream, past Triton's launch path
        return quantized, scales_out
    compiled = launch.through_triton()
    if direct_launch_works():
        _direct_launches[launch.key] = compiled
    return quantized, scales_out


def _input_key(rows: int, x_ptr: int, x_stride: int) -> tuple:
    """What Triton specializes on that comes with the input: its 16-byte alignment, the row count's being 1 or a
    multiple of 16, the row stride's being 1 or a multiple of 16, and either's passing 32 bits."""
    return (
        x_ptr % 16 == 0, rows == 1, rows % 16 == 0, x_stride == 1, x_stride % 16 == 0, rows >= 2**31,
        x_stride >= 2**31,
    )  # fmt: skip


class _Launch(NamedTuple):
    """One launch of ``_quant_rows_kernel``: its arguments in the kernel's order (constexprs last), grid and warps.

    ``key`` holds what Triton specializes a compiled kernel on for these arguments (each tensor's dtype and 16-byte
    alignment, which pointers are ``None``; each integer's being 1, a multiple of 16, or past 32 bits; the
    constexprs; the warps) and the device: launches with equal keys run the same compiled kernel."""

    arguments: tuple
    grid: tuple[int, int, int]
    num_warps: int
    key: tuple

    @classmethod
    def of(cls, x2d, quantized, row_scales, scale, history, next_history, overshoot, dtype, margin, mode) -> _Launch:
        rows, cols = x2d.shape
        x_stride = x2d.stride(0)
        buffers = (scale, history, next_history, overshoot)
        key = (
            *_fixed_key(x2d.dtype, dtype, mode, cols, row_scales is not None, buffers),
            *_input_key(rows, x2d.data_ptr(), x_stride),
        )
        arguments = _arguments(x2d, quantized, row_scales, buffers, rows, cols, x_stride, dtype, margin, mode)
        _, rows_per_program, _, num_warps = _launch_shape(cols)
        return cls(arguments, (triton.cdiv(rows, rows_per_program), 1, 1), num_warps, key)

    def through_triton(self):
        """Triton's own launch (compiling on first use); returns the compiled kernel."""
        mode, row_scales, one_block, rows_per_program, block = self.arguments[-5:]
        return _quant_rows_kernel[self.grid](
            *self.arguments[:-5],
            MODE=mode,
            ROW_SCALES=row_scales,
            ONE_BLOCK=one_block,
            ROWS=rows_per_program,
            BLOCK=block,
            num_warps=self.num_warps,
        )


def _fixed_key(x_dtype: torch.dtype, dtype: torch.dtype, mode: int, cols: int, row_scales: bool, buffers) -> tuple:
    """The part of a launch's key that one layer's launches share: the device, the dtypes, the mode, the row length
    (the constexprs and warps follow from it), and each one-element buffer's dtype and alignment (or its absence)."""
    return (
        torch.cuda.current_device(), x_dtype, dtype, mode, cols, row_scales,
        tuple(None if t is None else (t.dtype, t.data_ptr() % 16 == 0) for t in buffers),
    )  # fmt: skip


def _arguments(x2d, quantized, row_scales, buffers, rows, cols, x_stride, dtype, margin, mode) -> tuple:
    """The kernel's arguments in its order, constexprs last (the outputs are new allocations: row stride ``cols``)."""
    one_block, rows_per_program, block, _ = _launch_shape(cols)
    constants = (mode, row_scales is not None, one_block, rows_per_program, block)
    return (
        x2d, quantized, row_scales, *buffers, rows, cols, x_stride, cols, fp8_max(dtype), AMAX_FLOOR, float(margin),
        *constants,
    )  # fmt: skip


class RowQuantizer:
    """``_quant_rows_kernel`` launches for one layer: one mode, input and fp8 dtype, row length and device, with
    the fixed part of the key, the grid's divisor and the constants worked out once. A call derives only what
    comes with its input (``_input_key``) and calls the compiled kernel's launcher itself (``launcher_of``: no
    argument binding, no closure per call; Triton's launch hooks, a profiler's, are not called on this path);
    anything it has not seen yet (a first shape, another current device, a Triton without the direct launch) takes
    ``_launch``.

    ``buffers``: ``(scale, history, next_history, overshoot)`` for the call (``None`` where the mode reads none);
    they must keep the dtype and alignment of the first call's (the layer's own float32 buffers do).

    ``scratch``: the outputs of calls of few rows come from buffers kept per device, stream, thread and shape and
    shared by every layer (``_scratch_outputs``), instead of two allocations per call. Only for a caller that hands
    them to one GEMM on the same stream at once (the prepared ``_scaled_mm`` product): the next quantization on
    that stream, of any layer, writes over them after that GEMM in stream order. Never inside a CUDA-graph capture
    (a graph would keep their addresses)."""

    def __init__(self, mode: int, x_dtype: torch.dtype, dtype: torch.dtype, cols: int, device: torch.device,
                 margin: float = 1.0, row_scales: bool = False, scratch: bool = False) -> None:  # fmt: skip
        self.mode, self.x_dtype, self.dtype, self.cols, self.margin = mode, x_dtype, dtype, cols, float(margin)
        self.device, self.device_index = device, device.index if device.index is not None else 0
        self.row_scales = mode == DYNAMIC or row_scales
        one_block, self.rows_per_program, block, _ = _launch_shape(cols)
        self.limit = fp8_max(dtype)
        self.constants = (mode, self.row_scales, one_block, self.rows_per_program, block)
        self.compiled: dict[tuple, object] = {}
        self.launchers: dict[tuple, tuple] = {}  # input key -> (run, function, packed metadata)
        self.scratch_rows = SCRATCH_BYTES // cols if scratch else 0

    def __call__(
        self, x2d: torch.Tensor, buffers: tuple = (None, None, None, None)
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = x2d.shape[0]
        x_stride = x2d.stride(0)
        key = _input_key(rows, x2d.data_ptr(), x_stride)
        launcher = self.launchers.get(key)
        if launcher is None or torch._C._cuda_getDevice() != self.device_index:
            return self._first(x2d, buffers, key)
        stream = torch._C._cuda_getCurrentRawStream(self.device_index)
        if rows <= self.scratch_rows and not torch._C._cuda_isCurrentStreamCapturing():
            quantized, scales = _scratch_outputs(self, rows, stream)
        else:
            quantized = torch.empty((rows, self.cols), dtype=self.dtype, device=self.device)
            scales = torch.empty((rows, 1), dtype=torch.float32, device=self.device) if self.row_scales else None
        run, function, metadata = launcher
        run(-(-rows // self.rows_per_program), 1, 1, stream, function, metadata, None, None, None, x2d, quantized,
            scales, *buffers, rows, self.cols, x_stride, self.cols, self.limit, AMAX_FLOOR, self.margin,
            *self.constants)  # fmt: skip
        return quantized, scales

    def _first(self, x2d: torch.Tensor, buffers: tuple, key: tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Through ``_launch``; its compiled kernel is kept for this input key where the direct launch works."""
        out = _launch(x2d, self.dtype, self.mode, *buffers, margin=self.margin, row_scales=self.row_scales)
        if torch.cuda.current_device() == self.device_index:
            fixed = _fixed_key(self.x_dtype, self.dtype, self.mode, self.cols, self.row_scales, buffers)
            compiled = _direct_launches.get((*fixed, *key))
            launcher = launcher_of(compiled) if compiled is not None else None
            if launcher is not None:
                if len(self.compiled) > 16:  # input keys of many odd views
                    self.compiled.clear()
                    self.launchers.clear()
                self.compiled[key] = compiled
                self.launchers[key] = launcher
        return out


# The most bytes of fp8 codes one shared output buffer holds (``RowQuantizer``'s ``scratch``): calls of a few hundred
# rows, where two allocations are a fifth of the call's host time (bench/NOTES.md, host cost); larger calls wait
# for the GPU, not for the host.
SCRATCH_BYTES = 4 << 20
# The most bytes all shared buffers hold together (many prompt lengths each bring a shape): past it the table starts
# again, so that memory ComfyUI does not account for stays small.
SCRATCH_TOTAL_BYTES = 32 << 20
_scratch: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}


def _scratch_outputs(quantizer: RowQuantizer, rows: int, stream: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The shared output buffers for ``rows`` rows of ``quantizer``'s on this device and stream (made on first use;
    the table is emptied when the buffers would pass ``SCRATCH_TOTAL_BYTES``: a buffer still queued for a GEMM stays
    alive until that GEMM has run, as any freed tensor does)."""
    # The thread too: two threads quantizing on one stream (the legacy default stream) must not share buffers.
    key = (quantizer.device_index, stream, threading.get_ident(), rows, quantizer.cols, quantizer.dtype,
           quantizer.row_scales)  # fmt: skip
    outputs = _scratch.get(key)
    if outputs is None:
        quantized = torch.empty((rows, quantizer.cols), dtype=quantizer.dtype, device=quantizer.device)
        scales = torch.empty((rows, 1), dtype=torch.float32, device=quantizer.device) if quantizer.row_scales else None
        outputs = (quantized, scales)
        if sum(_nbytes(held) for held in list(_scratch.values())) + _nbytes(outputs) > SCRATCH_TOTAL_BYTES:
            _scratch.clear()
        _scratch[key] = outputs
    return outputs


def _nbytes(outputs: tuple[torch.Tensor, torch.Tensor | None]) -> int:
    return sum(tensor.nbytes for tensor in outputs if tensor is not None)


def launcher_of(compiled) -> tuple | None:
    """``(run, function, packed metadata)`` of a compiled kernel where this Triton has them (3.x), else ``None``
    (every launch then takes Triton's own path)."""
    try:
        compiled._init_handles()
        return compiled.run, compiled.function, compiled.packed_metadata
    except AttributeError:
        return None


def checked_once_per_device(results: dict[int, bool], device: torch.device,
                            check: Callable[[torch.device], bool], what: str) -> bool:  # fmt: skip
    """Whether ``check`` passed on ``device``: a Triton path's comparison with a float computation of the same
    numbers, made once per GPU before any layer takes the path and kept in ``results`` (by device index). Not made
    inside a CUDA-graph capture (it waits for the GPU; the next eager call makes it); an error counts as a failure,
    logged with ``what`` (the path's name)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index in results:
        return results[index]
    if torch.cuda.is_current_stream_capturing():
        return False
    results[index] = False
    try:
        results[index] = check(torch.device("cuda", index))
    except Exception as error:  # any failure only means the path is not taken
        logger.info("%s is unavailable on %s: %s", what, torch.cuda.get_device_name(index), error)
    logger.debug("%s on cuda:%d: %s", what, index, "on" if results[index] else "off")
    return results[index]


_launch_shapes: dict[int, tuple[bool, int, int, int]] = {}


def _launch_shape(cols: int) -> tuple[bool, int, int, int]:
    """(whole row in one block, rows per program, block, warps) for rows of ``cols`` values."""
    shape = _launch_shapes.get(cols)
    if shape is None:
        one_block = cols <= _ONE_BLOCK_MAX
        block = triton.next_power_of_2(cols) if one_block else 4096
        rows_per_program = max(1, min(16, _ELEMENTS_PER_PROGRAM // block)) if one_block else 1
        num_warps = 4 if block * rows_per_program <= 2048 else (8 if block * rows_per_program <= 8192 else 16)
        shape = _launch_shapes[cols] = (one_block, rows_per_program, block, num_warps)
    return shape


_direct_launches: dict[tuple, object] = {}  # launch key -> the compiled kernel Triton's launch returned
_direct_ok: bool | None = None


def direct_launch_works() -> bool:
    """Whether a direct launch of a compiled kernel computes what Triton's launch computes, on this Triton: checked
    once per process, on 3 x 40 and 1 x 40 values, into outputs that start as NaN. An error or any difference (an
    older or newer Triton whose compiled kernels take other arguments) keeps Triton's launch for good."""
    global _direct_ok
    if _direct_ok is None:
        if torch.cuda.is_current_stream_capturing():
            return False  # no check inside a CUDA-graph capture (it waits for the GPU); the next eager launch checks
        _direct_ok = False
        try:
            same = True
            for rows in (3, 1):  # one row: Triton turns an integer argument equal to 1 into a constant
                x = torch.linspace(-3.0, 5.0, rows * 40, device="cuda").reshape(rows, 40)

                def launch(x=x, rows=rows) -> tuple[_Launch, torch.Tensor, torch.Tensor]:
                    quantized = torch.full((rows, 40), float("nan"), device="cuda").to(torch.float8_e4m3fn)
                    scales = torch.full((rows, 1), float("nan"), device="cuda")
                    args = (x, quantized, scales, None, None, None, None, torch.float8_e4m3fn, 1.0, DYNAMIC)
                    return _Launch.of(*args), quantized.view(torch.uint8), scales

                normal, q_triton, s_triton = launch()
                compiled = normal.through_triton()
                direct, q_direct, s_direct = launch()
                compiled[direct.grid](*direct.arguments)
                same = same and torch.equal(q_triton, q_direct) and torch.equal(s_triton, s_direct)
                same = same and bool(s_direct.isfinite().all())
                run, function, metadata = launcher_of(compiled) or (None, None, None)
                raw, q_raw, s_raw = launch()  # as RowQuantizer calls it
                stream = torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())
                run(*raw.grid, stream, function, metadata, None, None, None, *raw.arguments)
                same = same and torch.equal(q_triton, q_raw) and torch.equal(s_triton, s_raw)
            _direct_ok = bool(same)
        except Exception as error:  # any failure only means Triton's own launch path
            logger.debug("direct launch of the quantization kernel unavailable: %s", error)
        logger.debug("direct launch of the quantization kernel: %s", "on" if _direct_ok else "off")
    return _direct_ok


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2 and x.stride(1) == 1:  # the kernels hand over rows already: no reshape to pay for
        return x
    x2d = x.reshape(-1, x.shape[-1])
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()


def quantize_dynamic_triton(x: torch.Tensor, dtype: torch.dtype, per_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x2d = _as_rows(x)
    quantized, row_scales = _launch(x2d, dtype, DYNAMIC)
    if per_token:
        if x2d is x:
            return quantized, row_scales
        return quantized.view(x.shape), row_scales.view(*x.shape[:-1], 1)
    # Per tensor: the row pass gives every row's amax for free; the tensor scale is their maximum.
    scale = row_scales.max()
    quantized, _ = _launch(x2d, dtype, STATIC, scale=scale.reshape(1))
    return quantized.view(x.shape), scale


def quantize_static_triton(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x2d = _as_rows(x)
    quantized, _ = _launch(x2d, dtype, STATIC, scale=scale.to(device=x.device, dtype=torch.float32).reshape(1))
    return quantized if x2d is x else quantized.view(x.shape)


def quantize_running_triton(
    x: torch.Tensor,
    dtype: torch.dtype,
    history: torch.Tensor,
    next_history: torch.Tensor,
    scale_out: torch.Tensor,
    overshoot: torch.Tensor,
    margin: float,
) -> torch.Tensor:
    """Quantize with the scale ``history`` gives, in the same pass raising ``next_history`` and ``overshoot``
    (float32 one-element buffers on x's device); ``scale_out`` receives the scale used."""
    quantized, _ = _launch(
        _as_rows(x),
        dtype,
        RUNNING,
        scale=scale_out,
        history=history,
        next_history=next_history,
        overshoot=overshoot,
        margin=margin,
    )
    return quantized.view(x.shape)


def quantize_groups_triton(x: torch.Tensor, dtype: torch.dtype, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1x``group`` groups per token: the per-row kernel on ``x`` seen as rows of ``group`` values (one group each).
    Returns ``(x_fp8, scale [..., K / group])``; ``K`` must be a multiple of ``group`` (the caller checks)."""
    rows = _as_rows(x)
    quantized, scales = _launch(rows.reshape(-1, group), dtype, DYNAMIC)
    return quantized.view(x.shape), scales.view(*x.shape[:-1], x.shape[-1] // group)
