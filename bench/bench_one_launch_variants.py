"""GPU time of variants of the one-launch fp8 linear's K loop at the rows where it is slow (scratch kernels).

Why: at 64-256 rows of a 5120-wide layer the pack's one launch (``fused_linear_triton``) takes 2-3x the GPU time of
the two launches (row quantizer + ``torch._scaled_mm``), more than its Triton GEMM alone explains. Candidates:
the activation's next ``BLOCK_K`` slice loaded one step ahead in registers (the software pipeliner does not stage a
load whose value goes through arithmetic before the dot, so each step would wait for it), the weight tile loaded
``[N, K]`` and transposed, loads without masks where ``K`` divides, and a plain Triton fp8 GEMM on codes quantized
beforehand (what a two-launch path with Triton's GEMM would cost: the pack's ``codes_gemm_triton`` kernel, which
came out of this bench). Static activation scale, per-channel weight
scale and a bias, as a bf16 file's layers run by default. Times: 20 calls captured in a CUDA graph, replayed
(median of rounds), so the host is out of them. Each variant's PTX is checked for ``wgmma`` (Hopper's async MMA).

Usage: python bench/bench_one_launch_variants.py [--json PATH] [--rounds 7]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_one_launch_tiles import graph_us  # this folder (the scripts run from it)

from fp8_quant import codes_gemm_triton, quant_triton
from fp8_quant.quant_triton import launcher_of


@triton.jit
def _variant_kernel(x_ptr, w_ptr, out_ptr, weight_scale_ptr, bias_ptr, scale_ptr, n_rows, n_out, n_in,
                    x_row_stride, w_row_stride, out_row_stride, fp8_limit,
                    PREFETCH: tl.constexpr, W_NK: tl.constexpr, EVEN_K: tl.constexpr, STAGES: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_mask = rows < n_rows
    out_mask = outs < n_out
    x_rows = x_ptr + rows[:, None].to(tl.int64) * x_row_stride
    inverse = 1.0 / tl.load(scale_ptr).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if PREFETCH:
        if EVEN_K:
            part = tl.load(x_rows + ks[None, :], mask=row_mask[:, None], other=0.0)
        else:
            part = tl.load(x_rows + ks[None, :], mask=row_mask[:, None] & (ks[None, :] < n_in), other=0.0)
    for start in tl.range(0, n_in, BLOCK_K, num_stages=STAGES):
        if PREFETCH:
            ahead = start + BLOCK_K
            if EVEN_K:
                following = tl.load(x_rows + ahead + ks[None, :], mask=row_mask[:, None] & (ahead < n_in), other=0.0)
            else:
                following = tl.load(x_rows + ahead + ks[None, :],
                                    mask=row_mask[:, None] & (ahead + ks[None, :] < n_in), other=0.0)  # fmt: skip
        else:
            if EVEN_K:
                part = tl.load(x_rows + start + ks[None, :], mask=row_mask[:, None], other=0.0)
            else:
                part = tl.load(x_rows + start + ks[None, :], mask=row_mask[:, None] & (start + ks[None, :] < n_in),
                               other=0.0)  # fmt: skip
        codes = tl.clamp(part.to(tl.float32) * inverse, -fp8_limit, fp8_limit).to(w_ptr.dtype.element_ty,
                                                                                   fp_downcast_rounding="rtne")
        if W_NK:
            w_tile = w_ptr + outs[:, None].to(tl.int64) * w_row_stride + start + ks[None, :]
            if EVEN_K:
                weight = tl.load(w_tile, mask=out_mask[:, None], other=0.0)
            else:
                weight = tl.load(w_tile, mask=out_mask[:, None] & (start + ks[None, :] < n_in), other=0.0)
            acc = tl.dot(codes, tl.trans(weight), acc)
        else:
            w_tile = w_ptr + outs[None, :].to(tl.int64) * w_row_stride + start + ks[:, None]
            if EVEN_K:
                weight = tl.load(w_tile, mask=out_mask[None, :], other=0.0)
            else:
                weight = tl.load(w_tile, mask=(start + ks[:, None] < n_in) & out_mask[None, :], other=0.0)
            acc = tl.dot(codes, weight, acc)
        if PREFETCH:
            part = following
    acc = acc * tl.load(scale_ptr).to(tl.float32)
    acc = acc * tl.load(weight_scale_ptr + outs, mask=out_mask, other=0.0)[None, :]
    acc = acc + tl.load(bias_ptr + outs, mask=out_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows[:, None].to(tl.int64) * out_row_stride + outs[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & out_mask[None, :])


@triton.jit
def _prologue_kernel(x_ptr, w_ptr, out_ptr, codes_ptr, weight_scale_ptr, bias_ptr, scale_ptr, n_rows, n_out, n_in,
                     x_row_stride, w_row_stride, out_row_stride, fp8_limit, STAGES: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     QUANT_K: tl.constexpr):  # fmt: skip
    """One launch: each program first writes its rows' codes (all of K) to a scratch ``[n_rows, n_in]`` that every
    program of the row block writes with the same values, then runs a plain fp8 GEMM reading them back (the loads
    the software pipeliner stages). The register double-buffer keeps the next slice's load in flight."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    out_mask = outs < n_out
    x_rows = x_ptr + rows[:, None].to(tl.int64) * x_row_stride
    code_rows = codes_ptr + rows[:, None].to(tl.int64) * n_in
    inverse = 1.0 / tl.load(scale_ptr).to(tl.float32)
    qk = tl.arange(0, QUANT_K)
    part = tl.load(x_rows + qk[None, :], mask=row_mask[:, None] & (qk[None, :] < n_in), other=0.0)
    for start in range(0, n_in, QUANT_K):
        ahead = start + QUANT_K
        following = tl.load(x_rows + ahead + qk[None, :], mask=row_mask[:, None] & (ahead + qk[None, :] < n_in),
                            other=0.0)  # fmt: skip
        codes = tl.clamp(part.to(tl.float32) * inverse, -fp8_limit, fp8_limit).to(w_ptr.dtype.element_ty,
                                                                                   fp_downcast_rounding="rtne")
        tl.store(code_rows + start + qk[None, :], codes, mask=row_mask[:, None] & (start + qk[None, :] < n_in))
        part = following
    tl.debug_barrier()
    ks = tl.arange(0, BLOCK_K)
    w_cols = w_ptr + outs[None, :].to(tl.int64) * w_row_stride
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in tl.range(0, n_in, BLOCK_K, num_stages=STAGES):
        k_mask = start + ks < n_in
        a = tl.load(code_rows + start + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_cols + start + ks[:, None], mask=k_mask[:, None] & out_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc)
    acc = acc * tl.load(scale_ptr).to(tl.float32)
    acc = acc * tl.load(weight_scale_ptr + outs, mask=out_mask, other=0.0)[None, :]
    acc = acc + tl.load(bias_ptr + outs, mask=out_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows[:, None].to(tl.int64) * out_row_stride + outs[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & out_mask[None, :])


def wall_us(fns: dict, rounds: int, calls: int = 200) -> dict:
    """Host-and-GPU time per call as a layer sees it: ``calls`` eager calls then one sync, median of interleaved
    rounds (each function in turn per round)."""
    times: dict = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    torch.cuda.synchronize()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) * 1e6 / calls)
    return {name: statistics.median(values) for name, values in times.items()}


TILES = ((64, 64, 128, 4), (64, 128, 128, 4), (64, 256, 128, 8), (128, 128, 128, 8), (32, 128, 128, 4),
         (16, 64, 256, 4))  # fmt: skip
VARIANTS = {  # name: (PREFETCH, W_NK, EVEN_K)
    "as the pack": (False, False, False),
}


def launch_variant(kernel, grid, args, meta) -> object:
    """One launch of ``kernel`` (a ``partial`` of this takes no closure over a loop's variables)."""
    return kernel[grid](*args, **meta)


def direct_call(launch: functools.partial, out_index: int, out_shape: tuple, out_dtype) -> object:
    """``launch`` (a ``launch_variant`` partial) as the pack calls its kernels: the compiled kernel's launcher
    directly, a new output per call."""
    kernel, grid, args, meta = launch.args
    compiled = launch()
    run, function, metadata = launcher_of(compiled)
    constants = [meta[name] for name in kernel.arg_names[len(args):]]
    device = args[0].device

    def call():
        out = torch.empty(out_shape, dtype=out_dtype, device=device)
        values = list(args)
        values[out_index] = out
        run(grid[0], grid[1], 1, torch._C._cuda_getCurrentRawStream(device.index or 0), function, metadata,
            None, None, None, *values, *constants)  # fmt: skip
        return out

    return call


def host_times(row: dict, launchers: dict, x, problem: dict, buffers: tuple, rounds: int) -> dict:
    """Per-call wall time (host and GPU) of bf16 ``F.linear``, the pack's two launches (row quantizer +
    ``_scaled_mm``), the row quantizer + the best Triton codes GEMM launched directly, and the best one-launch
    prologue kernel launched directly."""
    weight, weight_scale, bias, quantizer = (problem[k] for k in ("weight", "weight_scale", "bias", "quantizer"))
    scale_b = weight_scale.reshape(1, -1)
    shape = (x.shape[0], weight.shape[0])

    def best(prefix):
        mine = [(k, v["us"]) for k, v in row["variants"].items() if k.startswith(prefix)]
        return min(mine, key=lambda item: item[1])[0] if mine else None

    fns = {"bf16": functools.partial(F.linear, x, problem["weight_bf16"], bias)}

    def two_launches():
        c, s = quantizer(x, buffers)
        return torch._scaled_mm(c, weight.t(), scale_a=s, scale_b=scale_b, bias=bias, out_dtype=torch.bfloat16,
                                use_fast_accum=True)  # fmt: skip

    fns["quantizer + _scaled_mm"] = two_launches
    gemm_key = best("codes GEMM")
    if gemm_key:
        gemm = direct_call(launchers[gemm_key], 2, shape, torch.bfloat16)

        def quantizer_and_gemm():
            quantizer(x, buffers)
            return gemm()  # reads the codes buffer it was built with (the quantizer's shared scratch or not)

        fns[f"quantizer + {gemm_key}"] = quantizer_and_gemm
    prologue_key = best("prologue")
    if prologue_key:
        fns[prologue_key] = direct_call(launchers[prologue_key], 2, shape, torch.bfloat16)
    return wall_us(fns, rounds)


def measure(width: int, rows: int, problem: dict, rounds: int) -> dict:
    """One problem's GPU times: bf16, the two launches, the quantizer alone, every variant and tile."""
    weight, weight_scale, bias, quantizer, scale = (problem[k] for k in ("weight", "weight_scale", "bias",
                                                                          "quantizer", "scale"))  # fmt: skip
    x = torch.randn(rows, width, device="cuda").to(torch.bfloat16)
    out = torch.empty(rows, width, device="cuda", dtype=torch.bfloat16)
    buffers = (scale, None, None, None)
    codes, row_scales = quantizer(x, buffers)
    scale_b = weight_scale.reshape(1, -1)
    reference = torch._scaled_mm(codes, weight.t(), scale_a=row_scales, scale_b=scale_b, bias=bias,
                                 out_dtype=torch.bfloat16).float()  # fmt: skip

    def two_launches():
        c, s = quantizer(x, buffers)
        return torch._scaled_mm(c, weight.t(), scale_a=s, scale_b=scale_b, bias=bias, out_dtype=torch.bfloat16,
                                use_fast_accum=True)  # fmt: skip

    row = {"width": width, "rows": rows,
           "bf16_us": graph_us(functools.partial(F.linear, x, problem["weight_bf16"], bias), rounds),
           "two_launches_us": graph_us(two_launches, rounds),
           "quantizer_us": graph_us(functools.partial(quantizer, x, buffers), rounds), "variants": {}}  # fmt: skip
    common = (weight_scale, bias, scale, rows, width, width)
    launchers: dict = {}
    for block_m, block_n, block_k, warps in TILES:
        if block_m > max(16, triton.next_power_of_2(rows)):
            continue
        grid = (triton.cdiv(width, block_n), triton.cdiv(rows, block_m))
        tile = {"STAGES": 3, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps}
        launches = {
            name: functools.partial(launch_variant, _variant_kernel, grid,
                                    (x, weight, out, *common, x.stride(0), weight.stride(0), out.stride(0), 448.0),
                                    {"PREFETCH": prefetch, "W_NK": w_nk, "EVEN_K": even_k, **tile})
            for name, (prefetch, w_nk, even_k) in VARIANTS.items() if not (even_k and width % block_k)
        }  # fmt: skip
        scratch = problem.setdefault("scratch", {}).setdefault(rows, torch.empty(rows, width, device="cuda",
                                                                                  dtype=weight.dtype))  # fmt: skip
        for quant_k in (256, 512):
            launches[f"prologue q{quant_k}"] = functools.partial(
                launch_variant, _prologue_kernel, grid,
                (x, weight, out, scratch, *common, x.stride(0), weight.stride(0), out.stride(0), 448.0),
                {**tile, "QUANT_K": quant_k})  # fmt: skip
        launches["codes GEMM"] = functools.partial(  # the pack's own (``codes_gemm_triton``), at this tile
            launch_variant, codes_gemm_triton._codes_gemm_kernel, grid,
            (codes, weight, out, scale, weight_scale, bias, rows, width, width, codes.stride(0), weight.stride(0),
             out.stride(0)),
            {"ROW_SCALES": False, "WEIGHT_PER_CHANNEL": True, "HAS_BIAS": True, "EXACT": False,
             "EVEN_K": width % block_k == 0, **tile})  # fmt: skip
        for name, launch in launches.items():
            key = f"{name} {block_m}x{block_n}x{block_k} w{warps}"
            launchers[key] = launch
            try:
                compiled = launch()
                torch.cuda.synchronize()
                error = float((out.float() - reference).norm() / reference.norm())
                us = graph_us(launch, rounds)
            except Exception as failure:  # shared memory past the GPU's, or a compile error
                print(f"  {key}: {type(failure).__name__} {str(failure)[:120]}")
                continue
            row["variants"][key] = {"us": us, "err_vs_two_launches": error,
                                    "wgmma": "wgmma" in compiled.asm.get("ptx", "")}  # fmt: skip
    row["wall_us"] = host_times(row, launchers, x, problem, buffers, rounds)
    print(f"K=N={width} rows={rows}: bf16 {row['bf16_us']:.1f} us, two launches {row['two_launches_us']:.1f}"
          f" (quantizer {row['quantizer_us']:.1f}); wall per call: "
          + ", ".join(f"{k} {v:.1f}" for k, v in row["wall_us"].items()))  # fmt: skip
    for name in (*VARIANTS, "prologue q256", "prologue q512", "codes GEMM"):
        mine = [(k, v) for k, v in row["variants"].items() if k.startswith(name + " ")]
        if mine:
            k, v = min(mine, key=lambda item: item[1]["us"])
            print(f"   best {k}: {v['us']:.1f} us wgmma={v['wgmma']} err={v['err_vs_two_launches']:.2g}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--rows", default="1,16,64,128,256,512")
    parser.add_argument("--widths", default="5120,3072")
    args = parser.parse_args()
    fp8 = torch.float8_e4m3fn
    results = []
    for width in map(int, args.widths.split(",")):
        weight = torch.randn(width, width, device="cuda").to(fp8)
        problem = {"weight": weight, "weight_scale": torch.rand(width, device="cuda") + 0.5,
                   "bias": torch.randn(width, device="cuda").to(torch.bfloat16),
                   "weight_bf16": weight.to(torch.bfloat16),
                   "quantizer": quant_triton.RowQuantizer(quant_triton.STATIC, torch.bfloat16, fp8, width,
                                                          torch.device("cuda"), row_scales=True),
                   "scale": torch.full((1,), 0.05, device="cuda")}  # fmt: skip
        for rows in map(int, args.rows.split(",")):
            results.append(measure(width, rows, problem, args.rounds))
    if args.json:
        meta = {"kind": "one-launch-variants", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "triton": triton.__version__,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
        args.json.write_text(json.dumps({**meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
