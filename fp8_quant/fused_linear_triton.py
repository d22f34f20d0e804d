"""One launch for an fp8 linear at few rows: the activation quantized inside the GEMM (CUDA only, Triton).

Why: at a few hundred rows or fewer a linear's GPU work takes microseconds and the call waits for the host. The
two-launch path (``quant_triton``'s row quantizer, then ``torch._scaled_mm``) pays for two launches and two
allocations; ``_scaled_mm``'s host cost alone is about a bf16 ``F.linear``'s (bench/NOTES.md, host cost). Here each
program loads its rows of ``x`` in the model's dtype, divides them by the activation scale, clamps and rounds them
to fp8 in registers, multiplies them with the fp8 weight on the tensor cores with fp32 accumulation, and applies
both scales and the bias before the one store: one launch, one allocation (the output).

The activation scale follows the row quantizer's three modes exactly (same division, clamp and rounding, same
floor): dynamic per row (a first pass over ``K`` for each row's amax), static (one given scale) and running (the
scale from ``history`` times the margin; ``next_history``, ``overshoot`` and the scale written out as the row
quantizer writes them), so a layer's numbers do not depend on which path a call took beyond accumulation order.
``FusedLinear`` has ``RowQuantizer``'s constructor and call shape (plus the weight), so the quantizers bind it
where they would bind a row quantizer (``QuantFP8.bind(..., launcher=...)``); ``fused_linear_works`` checks it once
per device against a float computation of the same codes before any layer uses it.
"""

from __future__ import annotations

import functools
import logging

import torch
import triton
import triton.language as tl

from .fp8_utils import AMAX_FLOOR, fp8_max
from .prepared import ColdLaunch
from .quant_triton import DYNAMIC, RUNNING, STATIC, checked_once_per_device, launcher_of

logger = logging.getLogger(__name__)

RECIPROCAL = False  # multiply by the scale's inverse instead of dividing (faster; a rare code one step apart)


@triton.jit
def _fused_linear_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    weight_scale_ptr,
    bias_ptr,
    scale_ptr,
    history_ptr,
    next_history_ptr,
    overshoot_ptr,
    n_rows,
    n_out,
    n_in,
    x_row_stride,
    w_row_stride,
    out_row_stride,
    fp8_limit,
    amax_floor,
    margin,
    MODE: tl.constexpr,
    WEIGHT_PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EXACT: tl.constexpr,
    RECIPROCAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_mask = rows < n_rows
    out_mask = outs < n_out
    x_rows = x_ptr + rows[:, None].to(tl.int64) * x_row_stride
    w_cols = w_ptr + outs[None, :].to(tl.int64) * w_row_stride
    if MODE == 0:  # dynamic: each row's amax over all of K first
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, n_in, BLOCK_K):
            mask = row_mask[:, None] & (start + ks[None, :] < n_in)
            part = tl.load(x_rows + start + ks[None, :], mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(part), axis=1))
        row_scale = tl.maximum(amax, amax_floor) / fp8_limit
        divisor = row_scale[:, None]
    elif MODE == 1:
        scale = tl.load(scale_ptr).to(tl.float32)
        divisor = scale
    else:
        history = tl.load(history_ptr)
        scale = tl.maximum(history, amax_floor) * margin / fp8_limit
        divisor = scale
    inverse = 1.0 / divisor
    seen = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, n_in, BLOCK_K):
        k_mask = start + ks < n_in
        part = tl.load(x_rows + start + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        part = part.to(tl.float32)
        if MODE == 2:
            seen = tl.maximum(seen, tl.max(tl.abs(part), axis=1))
        if RECIPROCAL:
            scaled = part * inverse
        else:
            scaled = part / divisor
        codes = tl.clamp(scaled, -fp8_limit, fp8_limit).to(w_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        weight = tl.load(w_cols + start + ks[:, None], mask=k_mask[:, None] & out_mask[None, :], other=0.0)
        if EXACT:
            acc += tl.dot(codes, weight)  # promoted to fp32 after every BLOCK_K products
        else:
            acc = tl.dot(codes, weight, acc)
    if MODE == 2:
        if pid_n == 0:  # one program per row block reports its rows (every column block saw the same rows)
            block_amax = tl.max(seen, axis=0)
            tl.atomic_max(next_history_ptr, tl.maximum(block_amax, history))
            ratio = block_amax / (scale * fp8_limit)
            tl.atomic_max(overshoot_ptr, ratio, mask=ratio > 1.0)
            if pid_m == 0:
                tl.store(scale_ptr, scale)
    if MODE == 0:
        acc = acc * row_scale[:, None]
    else:
        acc = acc * scale
    if WEIGHT_PER_CHANNEL:
        acc = acc * tl.load(weight_scale_ptr + outs, mask=out_mask, other=0.0)[None, :]
    else:
        acc = acc * tl.load(weight_scale_ptr)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + outs, mask=out_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows[:, None].to(tl.int64) * out_row_stride + outs[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & out_mask[None, :])


# (most rows, (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)): narrow column blocks at few rows (enough programs to read
# the weight at full bandwidth), wider ones as the rows grow (bench/bench_one_launch_tiles.py times the choices).
# The last entry takes any rows past the others'.
TILES: list[tuple[int, tuple[int, int, int, int, int]]] = [
    (16, (16, 32, 128, 4, 3)),
    (64, (64, 64, 128, 4, 3)),
    (1 << 62, (64, 128, 128, 4, 3)),
]


def _tiles(rows: int) -> tuple[int, int, int, int, int]:
    return next((tiles for most, tiles in TILES[:-1] if rows <= most), TILES[-1][1])


class FusedLinear:
    """One layer's fused launches for one activation mode (``RowQuantizer``'s constructor, bound by a partial to the
    layer's GEMM operands): ``(rows [M, K], buffers, weight [N, K]) -> (out [M, N], None)``.

    ``weight_scale``: float32, one value or one per output channel, on the device; ``bias``: ``[N]`` or ``None``;
    ``out_dtype``: the output's; ``exact``: fp32 promotion after every ``BLOCK_K`` products (``_scaled_mm``'s
    ``use_fast_accum=False``). The first call for an input key (rows, row stride, alignments) takes Triton's launch;
    later ones call the compiled kernel's launcher directly with the grid worked out then (no argument binding, no
    cache key, no closure per call; Triton's launch hooks, a profiler's, are not called on this path).

    A first launch for an input key inside a CUDA-graph capture raises ``ColdLaunch`` before doing anything, and the
    prepared call takes its two launches for that capture: Triton's own launch path inside a capture invalidated a
    text encoder's capture on the H200 (tests/test_gpu_text_encoder.py, new weights)."""

    def __init__(self, mode: int, x_dtype: torch.dtype, dtype: torch.dtype, cols: int, device: torch.device,
                 margin: float = 1.0, row_scales: bool = False, *, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None, out_dtype: torch.dtype, out_features: int,
                 exact: bool) -> None:  # fmt: skip
        del row_scales  # no scales come out: the GEMM takes them in
        self.mode, self.margin = mode, float(margin)
        self.device, self.device_index = device, device.index if device.index is not None else 0
        self.weight_scale = weight_scale.reshape(-1)
        self.per_channel = self.weight_scale.numel() != 1
        self.bias, self.out_dtype, self.out_features, self.exact = bias, out_dtype, out_features, exact
        self.middle = (out_features, cols)
        self.tail = (out_features, fp8_max(dtype), AMAX_FLOOR, self.margin, mode, self.per_channel,
                     bias is not None, exact, RECIPROCAL)  # fmt: skip
        self.launches: dict[tuple, tuple] = {}
        self.refused: str | None = None  # why this layer keeps its two launches (a compile or launch error)

    def __call__(self, x2d: torch.Tensor, buffers: tuple, weight: torch.Tensor) -> tuple[torch.Tensor, None]:
        rows, x_stride = x2d.shape[0], x2d.stride(0)
        key = (rows, x_stride, x2d.dtype, x2d.data_ptr() % 16, weight.data_ptr() % 16, weight.stride(0))
        launch = self.launches.get(key)
        if launch is None or torch._C._cuda_getDevice() != self.device_index:
            if self.refused is not None:
                raise ColdLaunch(self.refused)
            if torch.cuda.is_current_stream_capturing():
                raise ColdLaunch("the one-launch linear has not run eagerly for this input yet")
            return self._first(x2d, buffers, weight, key)
        out = torch.empty((rows, self.out_features), dtype=self.out_dtype, device=self.device)
        run, grid, function, metadata, blocks = launch
        run(grid[0], grid[1], grid[2], torch._C._cuda_getCurrentRawStream(self.device_index), function, metadata,
            None, None, None, x2d, weight, out, self.weight_scale, self.bias, *buffers, rows, *self.middle, x_stride,
            weight.stride(0), *self.tail, *blocks)  # fmt: skip
        return out, None

    def _first(self, x2d, buffers, weight, key) -> tuple[torch.Tensor, None]:
        """Triton's own launch (compiling on first use) on the layer's device; its compiled kernel's launcher is
        kept for ``key``. A compile or launch error (a tile past this GPU's shared memory) or a grid past CUDA's
        limit raises ``ColdLaunch`` before anything ran, and the layer keeps its two launches from then on."""
        rows = x2d.shape[0]
        block_m, block_n, block_k, warps, stages = _tiles(rows)
        grid = (triton.cdiv(self.out_features, block_n), triton.cdiv(rows, block_m), 1)
        if grid[1] > 65535:  # CUDA's limit on the second grid axis: a very narrow layer at very many rows
            raise ColdLaunch(f"{rows} rows need more row blocks than one launch takes")
        out = torch.empty((rows, self.out_features), dtype=self.out_dtype, device=self.device)
        try:
            with torch.cuda.device(self.device_index):
                compiled = _fused_linear_kernel[grid](
                    x2d, weight, out, self.weight_scale, self.bias, *buffers, rows, *self.middle, x2d.stride(0),
                    weight.stride(0), *self.tail[:4], MODE=self.mode, WEIGHT_PER_CHANNEL=self.per_channel,
                    HAS_BIAS=self.bias is not None, EXACT=self.exact, RECIPROCAL=RECIPROCAL, BLOCK_M=block_m,
                    BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
                )  # fmt: skip
        except Exception as error:  # compiling or loading failed before the kernel ran: the two launches
            self.refused = f"the one-launch linear failed here ({type(error).__name__}: {str(error)[:200]})"
            logger.info("%s; this layer keeps its two launches", self.refused)
            raise ColdLaunch(self.refused) from None
        launcher = launcher_of(compiled)
        if launcher is not None and torch.cuda.current_device() == self.device_index:
            if len(self.launches) > 64:  # many prompt lengths or odd views
                self.launches.clear()
            self.launches[key] = (launcher[0], grid, launcher[1], launcher[2], (block_m, block_n, block_k))
        return out, None


def fused_linear(weight_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype, out_features: int,
                 exact: bool) -> functools.partial:  # fmt: skip
    """A launcher factory for the quantizers' ``bind(..., launcher=...)``: ``FusedLinear`` with this layer's GEMM
    operands bound."""
    return functools.partial(FusedLinear, weight_scale=weight_scale, bias=bias, out_dtype=out_dtype,
                             out_features=out_features, exact=exact)  # fmt: skip


_works: dict[int, bool] = {}


def fused_linear_works(device: torch.device) -> bool:
    """Whether the fused launch gives, on this GPU, what a float computation of the same fp8 codes gives: checked
    once per device (all three modes, a per-channel weight scale and a bias, 3 rows of 96), before any layer takes
    it. An error (a GPU whose Triton has no fp8 ``tl.dot``) or a difference keeps the two-launch path, logged."""
    return checked_once_per_device(_works, device, _check, "the one-launch fp8 linear")


def _check(device: torch.device) -> bool:
    fp8 = torch.float8_e4m3fn
    generator = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(3, 96, device=device, generator=generator) * 3).to(torch.bfloat16)
    weight = torch.randn(48, 96, device=device, generator=generator).to(fp8)
    weight_scale = torch.rand(48, device=device, generator=generator) + 0.5
    bias = torch.randn(48, device=device, generator=generator).to(torch.bfloat16)
    limit = fp8_max(fp8)
    for mode in (DYNAMIC, STATIC, RUNNING):
        scale = torch.full((1,), 0.02, device=device)
        history, next_history = torch.full((1,), 2.0, device=device), torch.zeros(1, device=device)
        overshoot = torch.zeros(1, device=device)
        buffers = (None, None, None, None) if mode == DYNAMIC else (scale, None, None, None)
        if mode == RUNNING:
            buffers = (scale, history, next_history, overshoot)
        launch = FusedLinear(mode, x.dtype, fp8, 96, device, margin=1.5, weight_scale=weight_scale, bias=bias,
                             out_dtype=torch.bfloat16, out_features=48, exact=True)  # fmt: skip
        launch(x, buffers, weight)  # Triton's launch, then the direct one on the same key
        if mode == RUNNING:
            next_history.zero_()
            overshoot.zero_()
        out, _ = launch(x, buffers, weight)
        values = x.float()
        if mode == DYNAMIC:
            divisor = values.abs().amax(dim=1, keepdim=True).clamp_min(AMAX_FLOOR) / limit
        elif mode == STATIC:
            divisor = torch.full((), 0.02, device=device)
        else:
            divisor = torch.full((), max(2.0, AMAX_FLOOR) * 1.5 / limit, device=device)
        codes = (values / divisor).clamp(-limit, limit).to(fp8).float()
        expected = (codes @ weight.float().t()) * divisor * weight_scale + bias.float()
        error = (out.float() - expected).norm() / expected.norm()
        if not bool(error < 0.01):
            logger.info("the one-launch fp8 linear differs on %s (mode %d, relative error %.3g): not used",
                        torch.cuda.get_device_name(device), mode, float(error))  # fmt: skip
            return False
        if mode == RUNNING:
            seen = float(values.abs().max())
            if abs(float(next_history) - max(seen, 2.0)) > 1e-6 * seen or abs(float(scale) - float(divisor)) > 1e-9:
                logger.info("the one-launch fp8 linear's running scale differs on %s: not used",
                            torch.cuda.get_device_name(device))  # fmt: skip
                return False
    return True


__all__ = ["FusedLinear", "fused_linear", "fused_linear_works"]
