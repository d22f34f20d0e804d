"""What ``quant_format`` ``auto`` takes where every layer is dequantized (a CPU): the error and time of one linear in
each 8-bit form, beside ComfyUI's own fp8 weight cast, at Wan 2.1 1.3B's shapes.

Why: on a CPU (and a GPU without FP8 or int8 tensor cores) no 8-bit GEMM runs, so an 8-bit layer's only gains are
memory, and its only costs the rounding of its weight and the per-call work of widening it. ``auto`` takes int8
rotated weights with unrounded activations there (``format_choice``); this measures that against fp8 weight-only
(what ``auto`` took before) and against ComfyUI's stock ``fp8_e4m3fn`` weights (``manual_cast``: the fp8 weight
cast to the compute dtype per call), on weights with the traits trained DiTs have (output channels over two
decades, a few large input columns) and inputs with outlier channels and tokens. Error: relative to the float32
layer; time: median of interleaved rounds, ratio to the float32 ``F.linear`` of the same run.

Usage: python bench/bench_cpu_formats.py [--json PATH] [--rounds 5] [--threads N] [--smoke]
(COMFYUI_DIR set: ComfyUI's own fp8 cast beside ours)
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_linear_host import comfy_ops

from fp8_quant import prepare_model_for_fp8
from fp8_quant.config import UserOptions, online_config
from fp8_quant.format_choice import resolve_quant_format
from fp8_quant.testing import outlier_input, rel_err

SHAPES = ((1536, 1536), (1536, 8960), (8960, 1536))  # Wan 2.1 1.3B: attention, FFN in, FFN out
ROWS = 512


def trained_like_linear(inputs: int, outputs: int, seed: int) -> nn.Linear:
    """A float32 linear with output channels over two decades and 1 in 64 input columns x8."""
    torch.manual_seed(seed)
    layer = nn.Linear(inputs, outputs)
    with torch.no_grad():
        layer.weight.mul_(torch.logspace(-1, 1, outputs).unsqueeze(1))
        layer.weight[:, ::64] *= 8
    return layer


def ours(layer: nn.Linear, options: UserOptions) -> nn.Module:
    model = nn.Sequential(nn.Linear(layer.in_features, layer.out_features))
    model.load_state_dict({f"0.{k}": v for k, v in layer.state_dict().items()})
    prepare_model_for_fp8(model, online_config(options))
    return model


def paths(layer: nn.Linear, comfy) -> dict:
    auto, _ = resolve_quant_format(UserOptions(quant_format="auto"), "cpu")
    found = {"float32 F.linear": layer}
    if comfy is not None:
        stock = comfy[1].Linear(layer.in_features, layer.out_features, dtype=torch.float32)
        stock.weight = nn.Parameter(layer.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
        stock.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        found["ComfyUI fp8_e4m3fn weights (manual_cast)"] = stock
    found["ours fp8, weight-only"] = ours(layer, UserOptions(quant_format="fp8"))
    found[f"ours auto ({auto.quant_format}, activation_scheme {auto.activation_scheme})"] = ours(layer, auto)
    return found


def measure(inputs: int, outputs: int, rows: int, rounds: int, comfy) -> dict:
    layer = trained_like_linear(inputs, outputs, seed=inputs + outputs)
    x = outlier_input(rows, inputs, seed=1)
    table = paths(layer, comfy)
    times: dict[str, list[float]] = {name: [] for name in table}
    with torch.inference_mode():
        reference = F.linear(x, layer.weight, layer.bias)
        errors = {name: rel_err(fn(x).float(), reference) for name, fn in table.items()}
        for _ in range(rounds):
            for name, fn in table.items():
                start = time.perf_counter()
                fn(x)
                times[name].append((time.perf_counter() - start) * 1e3)
    base = statistics.median(times["float32 F.linear"])
    result = {"shape": f"{rows}x{inputs}x{outputs}", "paths": {}}
    for name in table:
        ms = statistics.median(times[name])
        result["paths"][name] = {"ms": ms, "x_float32": ms / base, "rel_err": errors[name]}
        print(f"{result['shape']:>16s} {name:52s} {ms:8.2f} ms {ms / base:5.2f}x  err {errors[name]:.4f}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--smoke", action="store_true", help="one tiny shape, one round (a test that it runs)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    comfy = comfy_ops()
    shapes, rows, rounds = (((256, 128),), 8, 1) if args.smoke else (SHAPES, ROWS, args.rounds)
    results = [measure(inputs, outputs, rows, rounds, comfy) for inputs, outputs in shapes]
    if args.json:
        meta = {"kind": "cpu-formats", "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
        args.json.write_text(json.dumps({**meta, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
