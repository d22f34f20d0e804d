"""The fused fp8 activation-quantization kernel (``quant_triton``, the hot path of every GPU forward) on the CPU,
through Triton's interpreter (``TRITON_INTERPRET=1``), against an independent torch computation of the same
numbers: each launch path (dynamic per token, dynamic per tensor, static, running with its history and overshoot,
1x128 groups), rows past one program's block of rows, odd widths, a 3-D input, a strided view, rows longer than one
block (the two-pass path), an all-zero row (the amax floor), e4m3 and e5m2, fp16 and fp32 inputs (the interpreter
computes with numpy, which has no bf16).

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

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECK = r"""
import json, sys, torch
sys.path[:0] = [REPO, REPO + "/tests"]
import triton
import triton.language as tl
torch.cuda.current_device = lambda: 0
torch.cuda.is_current_stream_capturing = lambda: False
from helpers import outlier_input
from fp8_quant import quant_triton

LIMIT = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
FLOOR = 1e-12  # an all-zero row's amax


@triton.jit
def _cast(x_ptr, q_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(q_ptr + offsets, tl.load(x_ptr + offsets, mask=mask).to(q_ptr.dtype.element_ty), mask=mask)


def cast(scaled, dtype):
    flat = scaled.contiguous().reshape(-1)
    out = torch.empty(flat.shape, dtype=dtype)
    _cast[(triton.cdiv(flat.numel(), 1024),)](flat, out, flat.numel(), BLOCK=1024)
    return out.view(scaled.shape)


def codes_of(x, scale, dtype):
    limit = LIMIT[dtype]
    return cast((x.float() / scale).clamp(-limit, limit), dtype)


def same(a, b):
    if a.dtype in LIMIT:
        return a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return a.shape == b.shape and torch.equal(a, b)


def inputs(shape, dtype, seed):
    x = (outlier_input(*shape, seed=seed) / 8).to(dtype)
    if len(shape) == 2 and shape[0] > 2:
        x[1] = 0  # an all-zero row: the floor keeps its scale positive
    return x


results = {}
cases = [((1, 40), torch.float16), ((45, 320), torch.float16), ((2, 7, 96), torch.float32),
         ((3, 16400), torch.float16), ((17, 2048), torch.float32)]
for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
    limit = LIMIT[fp8]
    for shape, dtype in cases:
        x = inputs(shape, dtype, seed=shape[0])
        name = f"{str(fp8)[-6:]} {dtype} {'x'.join(map(str, shape))}"
        rows = x.float().abs().amax(-1, keepdim=True)
        # dynamic per token
        q, s = quant_triton.quantize_dynamic_triton(x, fp8, True)
        scale = rows.clamp(min=FLOOR) / limit
        results[f"token {name}"] = [same(s, scale), same(q, codes_of(x, scale, fp8))]
        # dynamic per tensor: the largest row scale, then a static pass
        q, s = quant_triton.quantize_dynamic_triton(x, fp8, False)
        scale = x.float().abs().amax().clamp(min=FLOOR) / limit
        results[f"tensor {name}"] = [same(s, scale), same(q, codes_of(x, scale, fp8))]
        # static: a given scale, values past its range clamped
        given = torch.tensor(float(x.float().abs().max()) / limit / 3)
        q = quant_triton.quantize_static_triton(x, given, fp8)
        results[f"static {name}"] = [same(q, codes_of(x, given, fp8)), bool((q.float().abs() == limit).any())]
        # running: the scale from the history times the margin; the history and the overshoot follow this call
        amax = x.float().abs().amax()
        for label, past in (("within", 4 * amax), ("past", amax / 3)):
            history = past.reshape(1).float()
            next_history, scale_out, overshoot = torch.zeros(1), torch.zeros(1), torch.zeros(1)
            q = quant_triton.quantize_running_triton(x, fp8, history, next_history, scale_out, overshoot, 2.0)
            scale = history.clamp(min=FLOOR) * 2.0 / limit
            ratio = amax / (scale * limit)
            results[f"running {label} {name}"] = [
                same(scale_out, scale), same(q, codes_of(x, scale, fp8)),
                same(next_history, torch.maximum(history, amax.reshape(1))),
                same(overshoot, ratio if bool(ratio > 1) else torch.zeros(1)),
            ]
    # 1x128 groups per token: scales [..., K / 128]
    for shape in ((5, 384), (2, 3, 128), (33, 256)):
        x = inputs(shape, torch.float16, seed=7)
        q, s = quant_triton.quantize_groups_triton(x, fp8, 128)
        groups = x.float().reshape(*shape[:-1], shape[-1] // 128, 128)
        scale = groups.abs().amax(-1).clamp(min=FLOOR) / limit
        expected = codes_of(groups, scale[..., None], fp8).reshape(shape)
        results[f"groups {str(fp8)[-6:]} {'x'.join(map(str, shape))}"] = [same(s, scale), same(q, expected)]
# a strided view (rows with a stride past their width) goes to the kernel as it is
wide = inputs((9, 512), torch.float16, seed=9)
view = wide[:, 64:384]
q, s = quant_triton.quantize_dynamic_triton(view, torch.float8_e4m3fn, True)
scale = view.float().abs().amax(-1, keepdim=True).clamp(min=FLOOR) / 448.0
results["token strided view"] = [same(s, scale), same(q, codes_of(view, scale, torch.float8_e4m3fn))]
print("RESULT " + json.dumps(results))
"""


def test_fused_fp8_quantization_matches_torch_in_the_interpreter():
    pytest.importorskip("triton")
    done = subprocess.run(
        [sys.executable, "-c", f"REPO = {str(REPO)!r}\n" + CHECK],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, TRITON_INTERPRET="1"),
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    results = json.loads(lines[-1][len("RESULT ") :])
    assert len(results) == 2 * 5 * 5 + 2 * 3 + 1, sorted(results)
    failed = {name: flags for name, flags in results.items() if not all(flags)}
    assert not failed, failed
