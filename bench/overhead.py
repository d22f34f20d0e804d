"""CPU launch cost vs GPU time of ways to run a dynamic per-token FP8 linear (a tuning experiment).

Prints, per variant, the CPU time per call (host overhead) and the back-to-back wall time per call, for a
big DiT shape and a small text-encoder shape. Usage: python bench/overhead.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fp8_quant import Fp8Config, Fp8OnlineLinearMethod, QuantFP8
from fp8_quant.fp8_utils import quantize_input_dynamic, quantize_weight
from fp8_quant.quant_triton import quantize_dynamic_triton
from fp8_quant.scheme import PER_TOKEN

FP8 = torch.float8_e4m3fn


class Layer(torch.nn.Module):
    pass


def per_call(fn, calls: int = 300) -> tuple[float, float]:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    cpu = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / calls * 1e6
    return cpu, wall


def eager_quant(x):
    """The pack's eager dynamic per-token quantization (what ``QuantFP8`` runs off CUDA and under compile)."""
    return quantize_input_dynamic(x, FP8, per_token=True)


def compiled_linear_fn(x, weight, weight_scale_row):
    q, scale = eager_quant(x)
    return torch._scaled_mm(q, weight.t(), scale_a=scale, scale_b=weight_scale_row, out_dtype=torch.bfloat16)


def main() -> None:
    compiled_quant = torch.compile(eager_quant, dynamic=True)
    compiled_linear = torch.compile(compiled_linear_fn, dynamic=True)
    for m, k, n in [(4608, 3072, 9216), (256, 4096, 4096)]:
        run_shape(m, k, n, compiled_quant, compiled_linear)


def run_shape(m: int, k: int, n: int, compiled_quant, compiled_linear) -> None:
    print(f"\n== {m}x{k}x{n}")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    wq, ws = quantize_weight(w)
    ws_row = ws.view(1, -1)
    xq, xs = eager_quant(x)
    layer = Layer()
    layer.weight = torch.nn.Parameter(w.clone(), requires_grad=False)
    method = Fp8OnlineLinearMethod(Fp8Config(), "scaled_mm_rowwise")
    method.process_weights_after_loading(layer, "p")
    quant = QuantFP8(False, PER_TOKEN)
    variants = [
        ("bf16 F.linear", lambda: F.linear(x, w)),
        (
            "raw _scaled_mm rowwise",
            lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws_row, out_dtype=torch.bfloat16),
        ),
        ("empty x2 (alloc cost)", lambda: (torch.empty_like(xq), torch.empty(m, 1, device="cuda"))),
        ("triton quant kernel only", lambda: quantize_dynamic_triton(x, FP8, True)),
        ("QuantFP8 triton", lambda: quant(x)),
        ("eager quant (vector_norm)", lambda: eager_quant(x)),
        ("compiled quant", lambda: compiled_quant(x)),
        ("ours method.apply", lambda: method.apply(layer, x)),
        ("compiled quant + mm", lambda: compiled_linear(x, wq, ws_row)),
    ]
    for label, fn in variants:
        cpu, wall = per_call(fn)
        print(f"{label:30s} CPU {cpu:7.1f} us/call  wall {wall:7.1f} us/call")
    out_ref = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws_row, out_dtype=torch.bfloat16).float()
    for label, out in [("compiled", compiled_linear(x, wq, ws_row)), ("ours", method.apply(layer, x))]:
        print(label, "rel diff vs eager", ((out.float() - out_ref).norm() / out_ref.norm()).item())


if __name__ == "__main__":
    main()
