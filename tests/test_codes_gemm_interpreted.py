"""The Triton GEMM on fp8 codes (``codes_gemm_triton``) on the CPU, through Triton's interpreter
(``TRITON_INTERPRET=1``), launched as a layer's first call launches it (``launch_shape`` + ``launch``), against a
float64 computation of the same codes: every tile of the table (row counts that pick each), row scales and one
activation scale, per-channel and per-tensor weight scales, a bias or none, K a multiple of the tile's steps or not,
N not a multiple of any column block, operands that are views of wider rows. The interpreter multiplies exactly,
so the bound is float32 rounding; the compiled kernel, its direct launch, its masks past K (the interpreter reads
fp8 NaN as a number, so an unmasked load times a masked zero hides here) and its accumulation are checked on a GPU
(``test_gpu_codes_gemm.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_interpreted

REPO = Path(__file__).resolve().parents[1]
CHECK = r"""
import json, sys, torch
sys.path[:0] = [REPO, REPO + "/tests"]
from fp8_quant import codes_gemm_triton as gemm
fp8 = torch.float8_e4m3fn
generator = torch.Generator().manual_seed(0)
results = {}
cases = [(1, 320, 200, True, True, True, False), (16, 256, 72, False, False, False, True),
         (40, 320, 200, True, False, True, True), (100, 256, 136, False, True, True, False),
         (130, 384, 200, True, True, False, False), (300, 320, 136, True, False, True, False)]
for rows, cols, outs, row_scales, per_channel, bias, exact in cases:
    # Views of wider rows: a kernel that steps rows by K instead of their stride reads the wrong values.
    codes = torch.full((rows, cols + 64), float("nan")).to(fp8)[:, :cols]
    codes.copy_((torch.randn(rows, cols, generator=generator) * 60).clamp(-448, 448).to(fp8))
    weight = torch.full((outs, cols + 64), float("nan")).to(fp8)[:, :cols]
    weight.copy_(torch.randn(outs, cols, generator=generator).to(fp8))
    weight_scale = 10 ** (-2 * torch.rand(outs if per_channel else 1, generator=generator))
    scale_a = torch.rand(rows if row_scales else 1, 1, generator=generator) * 0.1 + 1e-3
    bias_values = torch.randn(outs, generator=generator).to(torch.float16) if bias else None
    out = torch.empty(rows, outs, dtype=torch.float32)
    grid, constants, warps = gemm.launch_shape(rows, outs, cols, (row_scales, per_channel, bias, exact))
    gemm.launch(codes, scale_a, weight, weight_scale, bias_values, out, grid, constants, warps)
    expected = (codes.double() @ weight.double().t()) * scale_a.double().reshape(-1, 1) * weight_scale.double()
    if bias:
        expected = expected + bias_values.double()
    error = float((out.double() - expected).norm() / expected.norm())
    results[f"{rows}x{cols}x{outs} tile {constants[-3:]} even K {constants[4]}"] = error
print("RESULT " + json.dumps(results))
"""


def test_the_gemm_gives_the_float_product_of_its_codes_in_the_interpreter():
    pytest.importorskip("triton")
    results = run_interpreted(CHECK, str(REPO))
    assert len(results) == 6, results
    tiles = {key.split(" tile ")[1].split(" even")[0] for key in results}
    assert len(tiles) == 4, tiles  # every entry of the tile table ran
    assert any("even K True" in key for key in results) and any("even K False" in key for key in results), results
    assert all(error < 1e-6 for error in results.values()), results
