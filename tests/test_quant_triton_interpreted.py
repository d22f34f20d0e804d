"""The fused fp8 activation-quantization kernel (``quant_triton``, the hot path of every GPU forward) on the CPU,
through Triton's interpreter (``TRITON_INTERPRET=1``), against an independent torch computation of the same
numbers (``tests/quant_reference.py``, which ``test_gpu_quant_paths.py`` runs on a GPU): each launch path (dynamic
per token, dynamic per tensor, static, running with its history and overshoot, 1x128 groups), rows past one
program's block of rows, odd widths, a 3-D input, a strided view, rows longer than one block (the two-pass path),
an all-zero row (the amax floor), e4m3 and e5m2, fp16 and fp32 inputs (the interpreter computes with numpy, which
has no bf16).

Scales, histories and overshoot must be equal to the last bit (the same float32 operations in the same order).
Codes must be equal to the reference's scaled values cast by the interpreter's own float32 -> fp8 conversion (a
one-line Triton kernel): that conversion differs from torch's on a few values next to a power of two (it does not
carry a rounding into the exponent), which is the interpreter's and not the kernel's; on the GPU the compiled
kernel's casts are checked against torch in ``tests/test_gpu.py``.

The launch path asks for the current CUDA device (its cache key) and whether a CUDA graph is being captured; on a
machine without CUDA the script answers both (device 0, no capture), and the direct-launch check, which needs CUDA
tensors, fails and leaves Triton's own launch for every call.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_interpreted
from quant_reference import expected_cases

REPO = Path(__file__).resolve().parents[1]
CHECK = r"""
import json, sys, torch
sys.path[:0] = [REPO, REPO + "/tests"]
import triton
import triton.language as tl
torch.cuda.current_device = lambda: 0
torch.cuda.is_current_stream_capturing = lambda: False
from fp8_quant import quant_triton
from quant_reference import check_all


@triton.jit
def _cast(x_ptr, q_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(q_ptr + offsets, tl.load(x_ptr + offsets, mask=mask).to(q_ptr.dtype.element_ty), mask=mask)


def interpreter_cast(scaled, dtype):
    flat = scaled.contiguous().reshape(-1)
    out = torch.empty(flat.shape, dtype=dtype)
    _cast[(triton.cdiv(flat.numel(), 1024),)](flat, out, flat.numel(), BLOCK=1024)
    return out.view(scaled.shape)


print("RESULT " + json.dumps(check_all(quant_triton, "cpu", interpreter_cast)))
"""


def test_fused_fp8_quantization_matches_torch_in_the_interpreter():
    pytest.importorskip("triton")
    results = run_interpreted(CHECK, str(REPO))
    assert len(results) == expected_cases(dtypes=2), sorted(results)
    # Exact: the same float32 operations in the same order, and codes through the same cast.
    failed = {name: measures for name, measures in results.items() if any(value != 0 for value in measures.values())}
    assert not failed, failed
