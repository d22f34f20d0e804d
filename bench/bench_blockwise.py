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

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_linear import make_input, our_layer, recorder, rows_by_shape, run_benchmark

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
    rows: list[dict] = []
    record = recorder(rows, name, (m, k, n), reference, 20 if quick else 50)

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
    for shape, shape_rows in rows_by_shape(rows).items():
        base = {r["method"]: r for r in shape_rows}
        baseline = base[BASELINE]["ms"] if BASELINE in base else float("nan")
        m, k, n = shape_rows[0]["mkn"]
        print(f"\n== {shape}  ({m}x{k}x{n}), weight with x8 input columns")
        print(f"{'method':40s} {'ms':>8s} {'TFLOP/s':>8s} {'x chan':>7s} {'rel err':>8s}")
        for r in shape_rows:
            print(f"{r['method']:40s} {r['ms']:8.3f} {r['tflops']:8.0f} {baseline / r['ms']:7.2f} {r['rel_err']:8.4f}")


def main() -> int:
    return run_benchmark(__doc__, run_shape, print_table, check=block_kernel_missing)


def block_kernel_missing(device: torch.device) -> str | None:
    ok, reason = BlockScaledMMKernel.is_supported(device)
    return None if ok else f"block-scaled _scaled_mm does not run here: {reason}"


if __name__ == "__main__":
    sys.exit(main())
