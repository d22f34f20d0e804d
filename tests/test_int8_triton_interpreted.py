"""The fused int8 Triton kernels' logic on the CPU, through Triton's interpreter (``TRITON_INTERPRET=1``), against
the torch operations they replace (``quant_int8``): codes and scales up to float32 summation order, the scaled
output and the int8 GEMM's (exact int32 sums, the same float32 epilogue) equal, for fp16 inputs (the interpreter
computes with numpy, which has no bf16). The GPU tests check the compiled kernels."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_interpreted

REPO = Path(__file__).resolve().parents[1]
CHECK = r"""
import json, sys, torch
sys.path[:0] = [REPO, REPO + "/tests"]
from helpers import outlier_input
from fp8_quant import int8_triton
from fp8_quant.quant_int8 import quantize_int8_rows
results = {}
for group, long_rows in ((256, 2048), (64, 2048), (None, 2048), (256, 0), (None, 0)):
    int8_triton.LONG_CALL_ROWS = long_rows  # 0: every call takes the long calls' blocks of rows
    for rows, width in ((1, 256), (45, 512), (3, 320)):
        if group == 256 and width % 256:
            continue
        x = (outlier_input(rows, width, seed=rows) / 16).to(torch.float16)
        codes, scales = int8_triton.quantize_rows(x, group)
        expected_codes, expected_scales = quantize_int8_rows(x, group)
        # The rotation sums in another order than torch's: last-bit scale differences, a rare code across a .5.
        step = (codes.int() - expected_codes.int()).abs()
        results[f"{group} {rows}x{width} {long_rows}"] = [
            bool(step.max() <= 1), bool((step > 0).float().mean() < 1e-3),
            bool(torch.allclose(scales, expected_scales, rtol=1e-6, atol=0)),
        ]
acc = torch.randint(-2**20, 2**20, (45, 130), dtype=torch.int32, generator=torch.Generator().manual_seed(1))
row, column = torch.rand(45, 1) * 1e-3, torch.rand(130) * 1e-2
bias = torch.randn(130).to(torch.float16)
for name, col, b in (("channel+bias", column, bias), ("tensor", torch.tensor(3e-3), None)):
    out = int8_triton.scale_bias(acc, row, col, b, torch.float16)
    expected = acc.float() * row * col.reshape(1, -1) + (b.float() if b is not None else 0)
    results[name] = [bool(torch.equal(out, expected.to(torch.float16)))]
generator = torch.Generator().manual_seed(2)
for rows, inner, cols in ((45, 192, 130), (3, 64, 40)):
    a = torch.randint(-127, 128, (rows, inner), dtype=torch.int8, generator=generator)
    w = torch.randint(-127, 128, (cols, inner), dtype=torch.int8, generator=generator)
    row, column = torch.rand(rows, 1, generator=generator) * 1e-3, torch.rand(cols, generator=generator) * 1e-2
    b = torch.randn(cols, generator=generator).to(torch.float16)
    out = int8_triton.scaled_int8_mm(a, w, row, column, b, torch.float16)
    expected = (a.int() @ w.int().t()).float() * row * column.reshape(1, -1) + b.float()
    results[f"gemm {rows}x{inner}x{cols}"] = [bool(torch.equal(out, expected.to(torch.float16)))]
print("RESULT " + json.dumps(results))
"""


def test_fused_int8_kernels_match_the_torch_operations_in_the_interpreter():
    pytest.importorskip("triton")
    results = run_interpreted(CHECK, str(REPO))
    assert results and all(all(flags) for flags in results.values()), results


CHECK_GROUPED = r"""
import json, sys, torch
sys.path[:0] = [REPO, REPO + "/tests"]
from helpers import grouped_int8_operands, grouped_int8_reference, outlier_input
from fp8_quant import int8_triton
from fp8_quant.quant_int8 import quantize_int8_rows
results = {}
for group, long_rows in ((256, 2048), (64, 2048), (64, 0)):
    int8_triton.LONG_CALL_ROWS = long_rows
    for rows, width in ((1, 256), (45, 512), (130, 768)):
        x = (outlier_input(rows, width, seed=rows) / 16).to(torch.float16)
        codes, scales = int8_triton.quantize_groups(x, group, group)
        expected_codes, expected_scales = quantize_int8_rows(x, group, scale_group=group)
        step = (codes.int() - expected_codes.int()).abs()
        results[f"codes {group} {rows}x{width} {long_rows}"] = [
            list(scales.shape) == [rows, width // group], bool(step.max() <= 1),
            bool((step > 0).float().mean() < 1e-3),
            bool(torch.allclose(scales, expected_scales, rtol=1e-6, atol=0)),
        ]
generator = torch.Generator().manual_seed(3)
for group, rows, inner, cols in ((256, 45, 512, 130), (64, 3, 192, 40), (64, 70, 128, 200)):
    a, w, row, column = grouped_int8_operands(group, rows, inner, cols, generator)
    b = torch.randn(cols, generator=generator).to(torch.float16)
    out = int8_triton.grouped_int8_mm(a, w, row.t(), column, group, b, torch.float32)
    expected = grouped_int8_reference(a, w, row, column, b, group)
    error = ((out.double() - expected).norm() / expected.norm()).item()
    results[f"gemm {group} {rows}x{inner}x{cols}"] = [error < 1e-6]
print("RESULT " + json.dumps(results))
"""


def test_grouped_int8_kernels_match_an_independent_computation_in_the_interpreter():
    """One scale per row and group: the codes and scales ``quant_int8`` computes, and the GEMM equal to a float64
    sum of each group's exact dot times its own two scales (wrong group index, a scale left out or the bias
    dropped each move it by far more than float32 rounding)."""
    pytest.importorskip("triton")
    results = run_interpreted(CHECK_GROUPED, str(REPO))
    assert results and all(all(flags) for flags in results.values()), results
