"""GPU time of the one-launch fp8 linear (``fused_linear_triton``) per tile choice, beside the two-launch path
(row quantizer + ``torch._scaled_mm``) and bf16 ``F.linear``, at the rows where a prepared call may take it.

Why: the one launch saves the host a launch and an allocation, but each column block quantizes its rows again and
Triton's GEMM is not cuBLAS's; past some rows x width the GPU time it adds outweighs what the host saves. Times
are GPU times (20 calls captured in a CUDA graph, replayed; median of rounds), so the host's speed is out of them.

Usage: python bench/bench_one_launch_tiles.py [--json PATH] [--rounds 5] [--quick]  (``--quick``: 5120 wide at 64
and 256 rows, the tiles most likely to win there)
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fp8_quant import fused_linear_triton as fused
from fp8_quant import quant_triton

WIDTHS = (3072, 5120)
ROWS = (1, 16, 64, 128, 256, 512, 1024)
CONFIGS = (
    (16, 32, 128, 4, 3), (16, 64, 128, 4, 3), (16, 64, 256, 4, 3), (32, 64, 128, 4, 3), (64, 64, 128, 4, 3),
    (64, 128, 128, 4, 3), (64, 128, 128, 4, 4), (64, 256, 128, 8, 3), (128, 128, 128, 8, 3), (128, 256, 128, 8, 3),
    (128, 128, 64, 4, 4),
)  # fmt: skip
CALLS = 20


def graph_us(fn, rounds: int) -> float:
    """GPU us per call: ``CALLS`` calls captured once, the graph replayed ``rounds`` times."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / CALLS)
    return statistics.median(times)


def measure(width: int, rows: int, weight, weight_scale, bias, row_quant, rounds: int) -> dict:
    """One problem's GPU times: bf16, the two launches, and the one launch per tile choice and scaling."""
    scale = torch.full((1,), 0.05, device="cuda")
    x = torch.randn(rows, width, device="cuda").to(torch.bfloat16)
    weight_bf16 = weight.to(torch.bfloat16)

    def two_launches():
        codes, scales = row_quant(x, (scale, None, None, None))
        return torch._scaled_mm(codes, weight.t(), scale_a=scales, scale_b=weight_scale.reshape(1, -1), bias=bias,
                                out_dtype=torch.bfloat16, use_fast_accum=True)  # fmt: skip

    def one_launch_for(config, reciprocal):
        """The layer's one launch with only ``config`` in the tile table and the scaling asked for."""
        tiles, scaling = fused.TILES, fused.RECIPROCAL
        fused.TILES, fused.RECIPROCAL = [(rows, config)], reciprocal
        try:
            launch = fused.FusedLinear(quant_triton.STATIC, torch.bfloat16, weight.dtype, width, torch.device("cuda"),
                                       weight_scale=weight_scale, bias=bias, out_dtype=torch.bfloat16,
                                       out_features=width, exact=False)  # fmt: skip
            launch(x, (scale, None, None, None), weight)  # compiles under this table, keeps the launcher
        finally:
            fused.TILES, fused.RECIPROCAL = tiles, scaling
        return lambda: launch(x, (scale, None, None, None), weight)

    row = {"width": width, "rows": rows, "bf16_us": graph_us(lambda: F.linear(x, weight_bf16, bias), rounds),
           "two_launches_us": graph_us(two_launches, rounds), "one_launch_us": {}}  # fmt: skip
    for config in CONFIGS:
        if config[0] > max(16, 1 << max(0, (rows - 1).bit_length())):
            continue  # row blocks mostly empty
        for reciprocal in (False, True):
            try:
                us = graph_us(one_launch_for(config, reciprocal), rounds)
            except Exception as error:  # a tile this GPU cannot run (shared memory)
                print(f"  {config} reciprocal={reciprocal}: {type(error).__name__}")
                continue
            row["one_launch_us"][f"{config} {'mul' if reciprocal else 'div'}"] = us
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    widths, rows_list = ((5120,), (64, 256)) if args.quick else (WIDTHS, ROWS)
    global CONFIGS
    if args.quick:
        CONFIGS = tuple(c for c in CONFIGS if c[0] >= 64)
    fp8 = torch.float8_e4m3fn
    results = []
    for width in widths:
        weight = torch.randn(width, width, device="cuda").to(fp8)
        weight_scale = torch.rand(width, device="cuda") + 0.5
        bias = torch.randn(width, device="cuda").to(torch.bfloat16)
        row_quant = quant_triton.RowQuantizer(quant_triton.STATIC, torch.bfloat16, fp8, width, torch.device("cuda"),
                                              row_scales=True)  # fmt: skip
        for rows in rows_list:
            row = measure(width, rows, weight, weight_scale, bias, row_quant, args.rounds)
            best = min(row["one_launch_us"].items(), key=lambda item: item[1])
            print(f"K=N={width} rows={rows:5d} bf16 {row['bf16_us']:7.1f} us, two launches "
                  f"{row['two_launches_us']:7.1f}, one launch best {best[1]:7.1f} {best[0]} "
                  f"(current {current(rows, row):7.1f})")  # fmt: skip
            results.append(row)
    if args.json:
        meta = {"kind": "one-launch-tiles", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
        args.json.write_text(json.dumps({**meta, "results": results}, indent=1))


def current(rows: int, row: dict) -> float:
    return row["one_launch_us"].get(f"{fused._tiles(rows)} div", float("nan"))


if __name__ == "__main__":
    main()
