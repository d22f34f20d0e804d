"""Block-wise scales on the GPU: speed and error of 128x128 blocks and fitted groups of 128 against per-channel.

For each shape (M x K x N) of bench_linear, on a weight with a few x8 input columns (the case block scales are
for), it times: bf16 ``F.linear``; our layers per channel (row-wise ``_scaled_mm``, the baseline), per tensor,
128x128 blocks and fitted groups of 128 per channel (block-scaled ``_scaled_mm``, with per-token activation scales
broadcast to 1x128 groups and with 1x128 activation groups), the groups on the dequantize kernel (what GPUs
without block-scaled GEMMs get), and the raw block-scaled ``_scaled_mm`` on pre-quantized operands. Prints
TFLOP/s, the ratio to the per-channel layer and the relative error vs a float32 reference.

Usage: python bench/bench_blockwise.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_linear import SHAPES, bench_ms, make_input, our_layer, rel_err

from fp8_quant import Fp8Config
from fp8_quant.fp8_utils import quantize_input_groups, quantize_weight
from fp8_quant.kernels import BlockScaledMMKernel
from fp8_quant.kernels.block_scaled_mm import block_scaled_mm
from fp8_quant.scheme import BLOCK_128

BASELINE = "ours per-channel (rowwise)"
VARIANTS = [
    (BASELINE, Fp8Config(weight_granularity="channel"), "scaled_mm_rowwise"),
    ("ours per-tensor", Fp8Config(weight_granularity="tensor", activation_granularity="tensor"), "scaled_mm_tensor"),
    ("ours block 128x128, token scales", Fp8Config(weight_granularity="block"), "scaled_mm_block"),
    (
        "ours block 128x128, 1x128 groups",
        Fp8Config(weight_granularity="block", activation_granularity="group"),
        "scaled_mm_block",
    ),
    ("ours auto: fitted groups of 128", Fp8Config(weight_granularity="auto"), "scaled_mm_block"),
    ("ours auto groups on dequant", Fp8Config(weight_granularity="auto"), "dequant"),
]


def outlier_column_weight(n: int, k: int) -> torch.Tensor:
    generator = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(n, k, device="cuda", generator=generator) / k**0.5
    weight *= torch.logspace(-1.5, 0.5, n, device="cuda")[:, None]
    columns = torch.randperm(k, device="cuda", generator=generator)[: max(4, k // 256)]
    weight[:, columns] *= 8
    return weight.to(torch.bfloat16)


def run_shape(name: str, m: int, k: int, n: int, quick: bool) -> list[dict]:
    weight = outlier_column_weight(n, k)
    x = make_input(m, k, seed=1)
    reference = x.float() @ weight.float().t()
    flops = 2.0 * m * k * n
    reps = 20 if quick else 50
    rows: list[dict] = []

    def record(label: str, fn) -> None:
        ms = bench_ms(fn, reps=reps)
        rows.append(
            {
                "shape": name,
                "mkn": [m, k, n],
                "method": label,
                "ms": ms,
                "tflops": flops / ms / 1e9,
                "rel_err": rel_err(fn(), reference),
            }
        )

    record("bf16 F.linear", lambda: F.linear(x, weight))
    for label, config, kernel in VARIANTS:
        layer, method = our_layer(weight, config, kernel)
        chosen = type(method.kernel_for(layer, x.device)).name
        if chosen != kernel:
            print(f"{name}: {label} runs on {chosen}, not {kernel}; skipped")
            continue
        record(label, lambda layer=layer, method=method: method.apply(layer, x))
    w_fp8, w_scale = quantize_weight(weight, group=BLOCK_128)
    x_fp8, x_scale = quantize_input_groups(x)
    record(
        "raw block _scaled_mm (pre-quantized)",
        lambda: block_scaled_mm(x_fp8, x_scale, w_fp8, w_scale, BLOCK_128, torch.bfloat16),
    )
    torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict]) -> None:
    by_shape: dict[str, list[dict]] = {}
    for row in rows:
        by_shape.setdefault(row["shape"], []).append(row)
    for shape, shape_rows in by_shape.items():
        base = {r["method"]: r for r in shape_rows}
        baseline = base[BASELINE]["ms"] if BASELINE in base else float("nan")
        m, k, n = shape_rows[0]["mkn"]
        print(f"\n== {shape}  ({m}x{k}x{n}), weight with x8 input columns")
        print(f"{'method':40s} {'ms':>8s} {'TFLOP/s':>8s} {'x chan':>7s} {'rel err':>8s}")
        for r in shape_rows:
            print(f"{r['method']:40s} {r['ms']:8.3f} {r['tflops']:8.0f} {baseline / r['ms']:7.2f} {r['rel_err']:8.4f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark runs on the GPU only")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device("cuda", torch.cuda.current_device())
    capability = torch.cuda.get_device_capability()
    print(f"device {torch.cuda.get_device_name()} capability {capability} torch {torch.__version__}")
    ok, reason = BlockScaledMMKernel.is_supported(device)
    print(f"block-scaled _scaled_mm: {'available' if ok else reason}")
    if not ok:
        return 1
    rows: list[dict] = []
    for name, m, k, n in SHAPES:
        rows.extend(run_shape(name, m, k, n, args.quick))
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
