"""A Triton fp8 GEMM on codes the row quantizer wrote, launched directly: the second of two launches at few hundred
rows (CUDA only).

Why: between a few dozen and a few hundred rows a linear's GPU work is a few tens of microseconds and the host
sets the pace. ``torch._scaled_mm`` costs the host about what a whole bf16 ``F.linear`` does (cuBLASLt's per-call
set-up), so the row quantizer plus ``_scaled_mm`` stays well above a bf16 linear there; the one-launch linear
(``fused_linear_triton``) saves that, but its activation, rounded in registers before the MMA, is not staged by
Triton's software pipeliner, and past a few dozen rows of a wide layer its GPU time is two to three times the two
launches'. This GEMM reads the codes from memory (both operands K-major, as Hopper's fp8 MMA takes them, so the
pipeliner stages both), applies the activation scales (one per row or one for all), the weight scale (per channel
or per tensor) and the bias in fp32 before its one store, and is launched through its compiled kernel's launcher
with the grid worked out once per input key: GPU time level with cuBLAS's up to ~512 rows of a 5120-wide layer
and about a third of ``_scaled_mm``'s host cost (bench/NOTES.md, host cost: Triton's GEMM on codes).

``codes_gemm_works`` checks it once per device against a float computation of the same codes before any layer
uses it; a first launch for an input key inside a CUDA-graph capture raises ``ColdLaunch`` (the caller takes
``_scaled_mm`` for that capture), as the one-launch linear does.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from .prepared import ColdLaunch
from .quant_triton import checked_once_per_device, launcher_of

logger = logging.getLogger(__name__)


@triton.jit
def _codes_gemm_kernel(
    a_ptr,
    w_ptr,
    out_ptr,
    a_scale_ptr,
    weight_scale_ptr,
    bias_ptr,
    n_rows,
    n_out,
    n_in,
    a_row_stride,
    w_row_stride,
    out_row_stride,
    ROW_SCALES: tl.constexpr,
    WEIGHT_PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EXACT: tl.constexpr,
    EVEN_K: tl.constexpr,
    STAGES: tl.constexpr,
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
    a_rows = a_ptr + rows[:, None].to(tl.int64) * a_row_stride
    w_cols = w_ptr + outs[None, :].to(tl.int64) * w_row_stride
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in tl.range(0, n_in, BLOCK_K, num_stages=STAGES):
        if EVEN_K:
            a = tl.load(a_rows + start + ks[None, :], mask=row_mask[:, None], other=0.0)
            w = tl.load(w_cols + start + ks[:, None], mask=out_mask[None, :], other=0.0)
        else:
            k_mask = start + ks < n_in
            a = tl.load(a_rows + start + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_cols + start + ks[:, None], mask=k_mask[:, None] & out_mask[None, :], other=0.0)
        if EXACT:
            acc += tl.dot(a, w)  # promoted to fp32 after every BLOCK_K products
        else:
            acc = tl.dot(a, w, acc)
    if ROW_SCALES:
        acc = acc * tl.load(a_scale_ptr + rows, mask=row_mask, other=0.0)[:, None]
    else:
        acc = acc * tl.load(a_scale_ptr)
    if WEIGHT_PER_CHANNEL:
        acc = acc * tl.load(weight_scale_ptr + outs, mask=out_mask, other=0.0)[None, :]
    else:
        acc = acc * tl.load(weight_scale_ptr)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + outs, mask=out_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows[:, None].to(tl.int64) * out_row_stride + outs[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & out_mask[None, :])


# (most rows, (BLOCK_M, BLOCK_N, BLOCK_K, warps)): the fastest tile per row count on an H200 at 3072 and 5120 wide
# (bench/bench_one_launch_variants.py, "codes GEMM"); the last entry takes any rows past the others'.
TILES: list[tuple[int, tuple[int, int, int, int]]] = [
    (16, (16, 64, 256, 4)),
    (64, (64, 64, 128, 4)),
    (128, (64, 128, 128, 4)),
    (1 << 62, (128, 128, 128, 8)),
]
STAGES = 3


def _tiles(rows: int) -> tuple[int, int, int, int]:
    return next((tiles for most, tiles in TILES[:-1] if rows <= most), TILES[-1][1])


def launch_shape(rows: int, out_features: int, in_features: int, flags: tuple) -> tuple[tuple, tuple, int]:
    """The grid, the kernel's constant arguments (``flags``: row scales, per-channel weight scale, bias, exact; then
    whether K divides into the tile's steps, and the tile) and the warps for a call of ``rows``."""
    block_m, block_n, block_k, warps = _tiles(rows)
    grid = (triton.cdiv(out_features, block_n), triton.cdiv(rows, block_m), 1)
    return grid, (*flags, in_features % block_k == 0, STAGES, block_m, block_n, block_k), warps


def launch(codes: torch.Tensor, scale_a: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
           bias: torch.Tensor | None, out: torch.Tensor, grid: tuple, constants: tuple, warps: int):  # fmt: skip
    """Triton's own launch of the kernel (compiling on first use), writing ``out``; its compiled kernel."""
    rows, out_features = out.shape
    return _codes_gemm_kernel[grid](codes, weight, out, scale_a, weight_scale, bias, rows, out_features,
                                    codes.shape[1], codes.stride(0), weight.stride(0), out.stride(0), *constants,
                                    num_warps=warps)  # fmt: skip


class CodesGemm:
    """One layer's GEMM on fp8 codes: ``(codes [M, K], scale_a, weight [N, K]) -> out [M, N]`` in ``out_dtype``.

    ``scale_a``: float32, ``[M]``/``[M, 1]`` where ``row_scales``, else one value; ``weight_scale``: float32, one
    value or one per output channel, on the device; ``bias``: ``[N]`` or ``None``; ``exact``: fp32 promotion after
    every ``BLOCK_K`` products (``_scaled_mm``'s ``use_fast_accum=False``). The first call for an input key takes
    Triton's launch; later ones call the compiled kernel's launcher directly (no argument binding, no cache key;
    Triton's launch hooks, a profiler's, are not called on this path)."""

    def __init__(self, weight_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
                 out_features: int, in_features: int, row_scales: bool, exact: bool,
                 device: torch.device) -> None:  # fmt: skip
        self.weight_scale = weight_scale.to(device, torch.float32).reshape(-1).contiguous()
        self.bias = bias.contiguous() if bias is not None else None
        self.out_dtype, self.out_features, self.in_features = out_dtype, out_features, in_features
        self.device, self.device_index = device, device.index if device.index is not None else 0
        self.flags = (row_scales, self.weight_scale.numel() != 1, bias is not None, exact)
        self.launches: dict[tuple, tuple] = {}
        self.refused: str | None = None  # why this layer keeps ``_scaled_mm`` (a compile or launch error)

    def __call__(self, codes: torch.Tensor, scale_a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        rows = codes.shape[0]
        key = (rows, codes.stride(0), codes.data_ptr() % 16, scale_a.data_ptr() % 16, weight.data_ptr() % 16,
               weight.stride(0))  # fmt: skip
        launch = self.launches.get(key)
        if launch is None or torch._C._cuda_getDevice() != self.device_index:
            if self.refused is not None:
                raise ColdLaunch(self.refused)
            if torch.cuda.is_current_stream_capturing():
                raise ColdLaunch("the Triton GEMM has not run eagerly for this input yet")
            return self._first(codes, scale_a, weight, key)
        out = torch.empty((rows, self.out_features), dtype=self.out_dtype, device=self.device)
        run, grid, function, metadata, constants = launch
        run(grid[0], grid[1], grid[2], torch._C._cuda_getCurrentRawStream(self.device_index), function, metadata,
            None, None, None, codes, weight, out, scale_a, self.weight_scale, self.bias, rows, self.out_features,
            self.in_features, codes.stride(0), weight.stride(0), self.out_features, *constants)  # fmt: skip
        return out

    def _first(self, codes, scale_a, weight, key) -> torch.Tensor:
        """Triton's own launch (compiling on first use); its compiled kernel's launcher is kept for ``key``. A
        compile or launch error, or a grid past CUDA's limit, raises ``ColdLaunch`` before anything ran, and the
        layer keeps ``_scaled_mm`` from then on."""
        rows = codes.shape[0]
        grid, constants, warps = launch_shape(rows, self.out_features, self.in_features, self.flags)
        if grid[1] > 65535:  # CUDA's limit on the second grid axis
            raise ColdLaunch(f"{rows} rows need more row blocks than one launch takes")
        out = torch.empty((rows, self.out_features), dtype=self.out_dtype, device=self.device)
        try:
            with torch.cuda.device(self.device_index):
                compiled = launch(codes, scale_a, weight, self.weight_scale, self.bias, out, grid, constants, warps)
        except Exception as error:  # compiling or loading failed before the kernel ran: ``_scaled_mm``
            self.refused = f"the Triton GEMM failed here ({type(error).__name__}: {str(error)[:200]})"
            logger.info("%s; this layer keeps torch._scaled_mm", self.refused)
            raise ColdLaunch(self.refused) from None
        launcher = launcher_of(compiled)
        if launcher is not None and torch.cuda.current_device() == self.device_index:
            if len(self.launches) > 64:  # many prompt lengths or odd views
                self.launches.clear()
            self.launches[key] = (launcher[0], grid, launcher[1], launcher[2], constants)
        return out


_works: dict[int, bool] = {}


def codes_gemm_works(device: torch.device) -> bool:
    """Whether the Triton GEMM gives, on this GPU, what a float computation of the same codes gives: checked once
    per device (row and one-value activation scales, per-channel and per-tensor weight scales, a bias or none,
    fast and exact accumulation, a row count per tile, K a multiple of the tile's or not). An error (a GPU whose
    Triton has no fp8 ``tl.dot``) or a difference keeps ``_scaled_mm``, logged."""
    return checked_once_per_device(_works, device, _check, "the Triton fp8 GEMM")


def _check(device: torch.device) -> bool:
    fp8 = torch.float8_e4m3fn
    generator = torch.Generator(device=device).manual_seed(0)
    for rows, cols, row_scales, per_channel, bias, exact in (
        (3, 96, True, True, True, True),
        (40, 256, False, False, False, False),
        (100, 320, True, False, True, False),
        (130, 256, False, True, False, True),
    ):  # fmt: skip
        codes = (torch.randn(rows, cols, device=device, generator=generator) * 40).to(fp8)
        weight = torch.randn(48, cols, device=device, generator=generator).to(fp8)
        weight_scale = torch.rand(48 if per_channel else 1, device=device, generator=generator) + 0.5
        scale_a = torch.rand(rows if row_scales else 1, 1, device=device, generator=generator) + 0.01
        bias_values = torch.randn(48, device=device, generator=generator).to(torch.bfloat16) if bias else None
        gemm = CodesGemm(weight_scale, bias_values, torch.bfloat16, 48, cols, row_scales, exact, device)
        gemm(codes, scale_a, weight)  # Triton's launch, then the direct one on the same key
        out = gemm(codes, scale_a, weight)
        expected = (codes.float() @ weight.float().t()) * scale_a.reshape(-1, 1) * weight_scale
        if bias_values is not None:
            expected = expected + bias_values.float()
        error = (out.float() - expected).norm() / expected.norm()
        if not bool(error < 0.01):
            logger.info("the Triton fp8 GEMM differs on %s (%d rows, relative error %.3g): not used",
                        torch.cuda.get_device_name(device), rows, float(error))  # fmt: skip
            return False
    return True


__all__ = ["CodesGemm", "codes_gemm_works"]
