"""Where an int8 linear's time goes on DiT shapes, and whether a Triton int8 GEMM with the scales and bias in its
epilogue beats ``torch._int_mm`` followed by a separate scaling pass (issue 21: the rotated int8 path's speed).

Per shape (Wan 2.1 14B at 480p and 1.3B at 320p, cond + uncond rows; Flux at 1024 px; and short 256-row calls),
in bf16: the bf16 linear; our fp8 per-token linear (one quantization pass, ``_scaled_mm`` with row and column
scales); the GEMMs alone (``_scaled_mm`` fp8, ``_int_mm``, the Triton int8 GEMM with its epilogue); and the whole
int8 rotated linear as it runs today (fused rotate+round, ``_int_mm``, fused scales) and with the Triton GEMM.
Each path is timed as a forward runs it (calls queued back to back), median of rounds, paths interleaved.

Usage: python bench/bench_int8_gemm.py [--json PATH] [--rounds N]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_linear import queued_ms  # this folder (the scripts run from it)

from fp8_quant import int8_triton
from fp8_quant.fp8_utils import quantize_input_dynamic
from fp8_quant.quant_int8 import quantize_int8_weight

SHAPES = [
    # name, M, K, N
    ("Wan14B 480p attn q/k/v/o", 28080, 5120, 5120),
    ("Wan14B 480p ffn up", 28080, 5120, 13824),
    ("Wan14B 480p ffn down", 28080, 13824, 5120),
    ("Wan14B cross k/v (text)", 1024, 5120, 5120),
    ("Wan1.3B 320p attn", 6400, 1536, 1536),
    ("Wan1.3B 320p ffn up", 6400, 1536, 8960),
    ("Wan1.3B 320p ffn down", 6400, 8960, 1536),
    ("Flux 1024px img qkv", 8192, 3072, 9216),
    ("Flux 1024px single linear1", 9216, 3072, 21504),
    ("256 rows, 5120x5120", 256, 5120, 5120),
]
GROUP = 256


def paths_for(m: int, k: int, n: int) -> tuple[dict, dict]:
    generator = torch.Generator(device="cuda").manual_seed(m + k + n)
    x = torch.randn(m, k, device="cuda", generator=generator).to(torch.bfloat16)
    x[:, :16] *= 20
    weight = (torch.randn(n, k, device="cuda", generator=generator) * 0.02).to(torch.bfloat16)
    bias = torch.randn(n, device="cuda", generator=generator).to(torch.bfloat16)
    # fp8: per-channel weight scales, per-token activations, as our auto path runs a bf16 file
    w_amax = weight.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    w_scale = (w_amax / 448.0).float()
    w_fp8 = (weight.float() / w_scale).to(torch.float8_e4m3fn)
    x_fp8, x_scale = quantize_input_dynamic(x)
    # int8: rotated in groups of 256, per-channel weight scales
    w_int8, w_int8_scale = quantize_int8_weight(weight, True, GROUP)
    codes, row_scale = int8_triton.quantize_rows(x, GROUP)
    column = w_int8_scale.view(1, -1)
    # int8 with one scale per row and group of 256 on both operands (activation_granularity group)
    w_grouped, w_group_scale = quantize_int8_weight(weight, True, GROUP, GROUP)
    group_codes, group_scale = int8_triton.quantize_groups(x, GROUP, GROUP)

    def fp8_gemm():
        return torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=x_scale, scale_b=w_scale.t(), bias=bias,
                                out_dtype=torch.bfloat16)

    def fp8_linear():
        q, s = quantize_input_dynamic(x)
        return torch._scaled_mm(q, w_fp8.t(), scale_a=s, scale_b=w_scale.t(), bias=bias, out_dtype=torch.bfloat16)

    def int_mm():
        return torch._int_mm(codes, w_int8.t())

    def int8_today():
        c, s = int8_triton.quantize_rows(x, GROUP)
        return int8_triton.scale_bias(torch._int_mm(c, w_int8.t()), s, column, bias, torch.bfloat16)

    def int8_triton_gemm():
        return int8_triton.scaled_int8_mm(codes, w_int8, row_scale, column, bias, torch.bfloat16)

    def int8_fused():
        c, s = int8_triton.quantize_rows(x, GROUP)
        return int8_triton.scaled_int8_mm(c, w_int8, s, column, bias, torch.bfloat16)

    def quantize_only():
        return int8_triton.quantize_rows(x, GROUP)

    def grouped_gemm():
        return int8_triton.grouped_int8_mm(group_codes, w_grouped, group_scale, w_group_scale, GROUP, bias,
                                           torch.bfloat16)

    def grouped_linear():
        c, s = int8_triton.quantize_groups(x, GROUP, GROUP)
        return int8_triton.grouped_int8_mm(c, w_grouped, s, w_group_scale, GROUP, bias, torch.bfloat16)

    paths = {
        "bf16 linear": lambda: F.linear(x, weight, bias),
        "fp8 linear (quant + _scaled_mm)": fp8_linear,
        "fp8 _scaled_mm alone": fp8_gemm,
        "int8 _int_mm alone": int_mm,
        "int8 Triton GEMM+epilogue alone": int8_triton_gemm,
        "int8 rotate+round alone": quantize_only,
        "int8 linear today (_int_mm + scale pass)": int8_today,
        "int8 linear, Triton GEMM": int8_fused,
        "int8 grouped GEMM alone": grouped_gemm,
        "int8 rotate+round grouped alone": lambda: int8_triton.quantize_groups(x, GROUP, GROUP),
        "int8 linear, group scales": grouped_linear,
    }
    # Correctness beside the timing: the Triton GEMM against today's path (same codes, same scales).
    reference = int8_triton.scale_bias(torch._int_mm(codes, w_int8.t()), row_scale, column, bias, torch.float32)
    fused = int8_triton.scaled_int8_mm(codes, w_int8, row_scale, column, bias, torch.float32)
    exact = x.double() @ weight.double().t() + bias.double()
    errors = {
        "row scales": int8_triton.scaled_int8_mm(codes, w_int8, row_scale, column, bias, torch.float32),
        "group scales": int8_triton.grouped_int8_mm(group_codes, w_grouped, group_scale, w_group_scale, GROUP, bias,
                                                    torch.float32),
    }
    checks = {"triton_vs_int_mm_max_abs": (fused - reference).abs().max().item()}
    checks.update({f"rel_err {key}": ((out.double() - exact).norm() / exact.norm()).item()
                   for key, out in errors.items()})
    return paths, checks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for name, m, k, n in SHAPES:
        paths, checks = paths_for(m, k, n)
        flops = 2.0 * m * k * n
        reps = max(3, min(50, int(2e13 / flops)))
        for fn in paths.values():  # compile, autotune, warm
            for _ in range(3):
                fn()
        torch.cuda.synchronize()
        samples: dict[str, list[float]] = {key: [] for key in paths}
        for _ in range(args.rounds):
            for key, fn in paths.items():
                samples[key].append(queued_ms(fn, reps))
        result = {key: sorted(values)[len(values) // 2] for key, values in samples.items()}
        tuned = getattr(int8_triton._scaled_int8_mm_tuned, "cache", {})
        tuned_grouped = getattr(int8_triton._grouped_int8_mm_tuned[GROUP], "cache", {})
        row = {"shape": name, "mkn": [m, k, n], "ms": result, "checks": checks,
               "tops": {key: flops / ms / 1e9 for key, ms in result.items() if "alone" in key and "round" not in key},
               "triton_configs": [str(config) for config in tuned.values()][-1:],
               "grouped_configs": [str(config) for config in tuned_grouped.values()][-1:]}
        rows.append(row)
        print(name, json.dumps({key: round(ms, 4) for key, ms in result.items()}), checks, row["triton_configs"],
              flush=True)
    meta = {"kind": "int8-gemm", "date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": __import__("triton").__version__,
            "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
