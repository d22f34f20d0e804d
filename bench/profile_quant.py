"""Where the time of one dynamic per-token FP8 linear goes: GPU kernels (profiler) and CPU launch cost.

Usage: python bench/profile_quant.py [M K N]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from overhead import per_call  # the same host/wall timing as the overhead experiment

from fp8_quant import Fp8Config, Fp8OnlineLinearMethod, QuantFP8
from fp8_quant.scheme import PER_TOKEN


class Layer(torch.nn.Module):
    pass


def main() -> None:
    m, k, n = (int(v) for v in sys.argv[1:4]) if len(sys.argv) >= 4 else (4608, 3072, 9216)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    layer = Layer()
    layer.weight = torch.nn.Parameter(torch.randn(n, k, device="cuda", dtype=torch.bfloat16), requires_grad=False)
    method = Fp8OnlineLinearMethod(Fp8Config(), "scaled_mm_rowwise")
    method.process_weights_after_loading(layer, "p")
    quant = QuantFP8(False, PER_TOKEN)
    for _ in range(20):
        method.apply(layer, x)
        quant(x)
    torch.cuda.synchronize()
    for label, fn in [("quant only", lambda: quant(x)), ("full linear", lambda: method.apply(layer, x))]:
        cpu_us, wall_us = per_call(fn, calls=200)
        print(f"{label}: CPU launch {cpu_us:.1f} us/call, wall (back to back) {wall_us:.1f} us/call")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            method.apply(layer, x)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8))


if __name__ == "__main__":
    main()
