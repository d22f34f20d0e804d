"""Two ways a per-tensor fp8 linear could beat the stock one on the same weights, measured on DiT shapes.

1. ``use_fast_accum``: cuBLASLt's fp8 GEMM without the periodic promotion of its partial sums to fp32. The stock
   path (comfy-kitchen's ``scaled_mm_v2``) turns it off. Timed both ways per shape, with the accumulation error
   it adds (vs an fp64 product of the same fp8 operands) beside the total error (vs the fp32 product of the
   unrounded operands).
2. A Triton GEMM that quantizes its bf16/fp16 A operand as it loads it (static per-tensor scale): no separate
   quantization pass over the activations. Compared with what runs today: the fused one-pass quantizer then
   ``_scaled_mm``.

Shapes: every linear of a Wan 2.1 14B / 1.3B block at 480p x 33 frames (14040 video + 512 text tokens) and of a
Flux.1 double/single block at 1024 px (4096 + 512 tokens), in the model's compute dtype (Wan fp16, Flux bf16).

Usage: python bench/bench_gemm_variants.py [--json PATH] [--no-triton-gemm]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_linear import bench_ms, make_input

from fp8_quant.fp8_utils import quantize_input_dynamic, quantize_weight
from fp8_quant.kernels.fast_accum import time_both
from fp8_quant.quant_fp8 import QuantFP8
from fp8_quant.scheme import PER_CHANNEL, PER_TENSOR
from fp8_quant.testing import rel_err

SHAPES = [
    # name, M, K, N, compute dtype
    ("Wan14B self-attn q/k/v/o, cross q/o", 14040, 5120, 5120, torch.float16),
    ("Wan14B cross k/v (text)", 512, 5120, 5120, torch.float16),
    ("Wan14B ffn up", 14040, 5120, 13824, torch.float16),
    ("Wan14B ffn down", 14040, 13824, 5120, torch.float16),
    ("Wan1.3B attn", 14040, 1536, 1536, torch.float16),
    ("Wan1.3B ffn up", 14040, 1536, 8960, torch.float16),
    ("Wan1.3B ffn down", 14040, 8960, 1536, torch.float16),
    ("Flux img qkv", 4096, 3072, 9216, torch.bfloat16),
    ("Flux img proj", 4096, 3072, 3072, torch.bfloat16),
    ("Flux img mlp up", 4096, 3072, 12288, torch.bfloat16),
    ("Flux img mlp down", 4096, 12288, 3072, torch.bfloat16),
    ("Flux single linear1", 4608, 3072, 21504, torch.bfloat16),
    ("Flux single linear2", 4608, 15360, 3072, torch.bfloat16),
    ("Flux txt qkv", 512, 3072, 9216, torch.bfloat16),
]


def triton_gemm():
    """The fused-quantization GEMM, built only where Triton and a GPU are there."""
    import triton
    import triton.language as tl

    configs = [
        triton.Config({"BM": bm, "BN": bn, "BK": 128, "GROUP": 8}, num_stages=s, num_warps=w)
        for bm, bn, s, w in [
            (128, 128, 3, 8),
            (128, 256, 3, 8),
            (128, 128, 4, 4),
            (128, 256, 4, 8),
            (64, 256, 4, 4),
            (256, 128, 3, 8),
        ]
    ]

    @triton.autotune(configs=configs, key=["M", "N", "K"])
    @triton.jit
    def kernel(
        a_ptr,
        b_ptr,
        c_ptr,
        bias_ptr,
        a_scale_ptr,
        b_scale_ptr,
        M,
        N,
        K,
        HAS_BIAS: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
        GROUP: tl.constexpr,
    ):
        pid = tl.program_id(0)
        grid_m = tl.cdiv(M, BM)
        grid_n = tl.cdiv(N, BN)
        per_group = GROUP * grid_n
        group = pid // per_group
        first_m = group * GROUP
        size_m = min(grid_m - first_m, GROUP)
        pid_m = first_m + (pid % per_group) % size_m
        pid_n = (pid % per_group) // size_m
        a_scale = tl.load(a_scale_ptr)
        inv = 1.0 / a_scale
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_k = tl.arange(0, BK)
        a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
        b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BK)):
            a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < K - k * BK), other=0.0)
            b = tl.load(b_ptrs, mask=(offs_n[None, :] < N) & (offs_k[:, None] < K - k * BK), other=0.0)
            a8 = (a.to(tl.float32) * inv).to(tl.float8e4nv)
            acc = tl.dot(a8, b, acc)
            a_ptrs += BK
            b_ptrs += BK
        acc = acc * (a_scale * tl.load(b_scale_ptr))
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

    def gemm(a, b, a_scale, b_scale, bias, out_dtype):
        m, k = a.shape
        n = b.shape[0]
        c = torch.empty(m, n, device=a.device, dtype=out_dtype)
        grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
        kernel[grid](a, b, c, bias if bias is not None else c, a_scale, b_scale, m, n, k, HAS_BIAS=bias is not None)
        return c

    return gemm


def run_shape(name, m, k, n, dtype, fused_gemm) -> dict:
    torch.manual_seed(0)
    weight = (torch.randn(n, k, device="cuda") / k**0.5).to(dtype)
    bias = (torch.randn(n, device="cuda") * 0.1).to(dtype)
    x = make_input(m, k, seed=1).to(dtype)
    exact = x.double() @ weight.double().t() + bias.double()
    w8, ws = quantize_weight(weight, group=PER_TENSOR)
    x8, xs = quantize_input_dynamic(x, per_token=False)
    xs = xs.reshape(())
    same_operands = (x8.double() * xs.double()) @ (w8.double() * ws.double()).t() + bias.double()
    flops = 2 * m * k * n
    row: dict = {"shape": name, "mkn": [m, k, n], "dtype": str(dtype).removeprefix("torch.")}

    w8c, wsc = quantize_weight(weight, group=PER_CHANNEL)
    x8t, xst = quantize_input_dynamic(x, per_token=True)

    def per_tensor(fast: bool) -> torch.Tensor:
        return torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=ws, bias=bias, out_dtype=dtype, use_fast_accum=fast)

    def row_wise(fast: bool) -> torch.Tensor:
        return torch._scaled_mm(
            x8t, w8c.t(), scale_a=xst, scale_b=wsc.view(1, -1), bias=bias, out_dtype=dtype, use_fast_accum=fast
        )

    for label, fast in (("cublas", False), ("cublas_fast_accum", True)):
        out = per_tensor(fast)
        ms = bench_ms(lambda fast=fast: per_tensor(fast), warmup=5, reps=20, rounds=5)
        row[label] = {
            "ms": ms,
            "tflops": flops / ms / 1e9,
            "accum_err": rel_err(out, same_operands),
            "err": rel_err(out, exact),
        }
    for label, fast in (("rowwise", False), ("rowwise_fast_accum", True)):
        out = row_wise(fast)
        ms = bench_ms(lambda fast=fast: row_wise(fast), warmup=5, reps=20, rounds=5)
        row[label] = {"ms": ms, "tflops": flops / ms / 1e9, "err": rel_err(out, exact)}
    row["in_model_timing_halves"] = {
        "tensor": time_both(per_tensor, flops, x.device),
        "rowwise": time_both(row_wise, flops, x.device),
    }
    quant = QuantFP8(static=True, group_shape=PER_TENSOR)
    row["quant_pass_ms"] = bench_ms(lambda: quant(x, xs), warmup=5, reps=20, rounds=5)
    for label, fast in (("today: quant + cublas", False), ("quant + cublas_fast_accum", True)):
        fn = lambda fast=fast: torch._scaled_mm(  # noqa: E731
            quant(x, xs)[0], w8.t(), scale_a=xs, scale_b=ws, bias=bias, out_dtype=dtype, use_fast_accum=fast
        )
        row[label] = {"ms": bench_ms(fn, warmup=5, reps=20, rounds=5)}
    if fused_gemm is not None:
        try:
            fn = lambda: fused_gemm(x, w8, xs, ws, bias, dtype)  # noqa: E731
            out = fn()
            ms = bench_ms(fn, warmup=3, reps=20, rounds=5)
            row["triton_fused_quant_gemm"] = {"ms": ms, "tflops": flops / ms / 1e9, "err": rel_err(out, exact)}
        except Exception as error:  # an experiment: record why it did not run
            row["triton_fused_quant_gemm"] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-triton-gemm", action="store_true")
    args = parser.parse_args()
    fused = None if args.no_triton_gemm else triton_gemm()
    rows = []
    for shape in SHAPES:
        row = run_shape(*shape, fused)
        rows.append(row)
        base, fast = row["cublas"], row["cublas_fast_accum"]
        today = row["today: quant + cublas"]["ms"]
        line = (
            f"{row['shape']:38s} cublas {base['ms']:.3f} ms ({base['tflops']:.0f} TF) err {base['err']:.5f} | "
            f"fast_accum {fast['ms']:.3f} ({base['ms'] / fast['ms']:.3f}x) accum_err {fast['accum_err']:.2e} "
            f"vs {base['accum_err']:.2e} err {fast['err']:.5f} | quant {row['quant_pass_ms']:.3f} | "
            f"today {today:.3f} fast {row['quant + cublas_fast_accum']['ms']:.3f}"
        )
        rw, rwf = row["rowwise"], row["rowwise_fast_accum"]
        line += f" | rowwise {rw['ms']:.3f} fast {rwf['ms']:.3f} ({rw['ms'] / rwf['ms']:.3f}x) err {rwf['err']:.5f}"
        line += f" | halves {row['in_model_timing_halves']}"
        fused_row = row.get("triton_fused_quant_gemm")
        if fused_row and "ms" in fused_row:
            speedup = today / fused_row["ms"]
            line += f" | triton fused {fused_row['ms']:.3f} ({speedup:.3f}x today) err {fused_row['err']:.5f}"
        elif fused_row:
            line += f" | triton fused: {fused_row['error']}"
        print(line, flush=True)
    result = {
        "kind": "gemm-variants",
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "rows": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
