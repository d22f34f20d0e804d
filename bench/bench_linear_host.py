"""Host cost of one linear call: us per call at few rows, where the GPU waits for the host, for bf16 and our paths.

Why: at 1 or 256 rows a linear's GPU work is a few microseconds, so a forward of many such calls (a text encoder, a
small or distilled DiT, the modulation linears) runs at the pace of the host's launches; an 8-bit path whose call
costs the host much more than a bf16 one loses there, however fast its GEMM. Calls are queued back to back, as in a
model's forward; each path is timed in every round, rounds interleaved (a clock change falls on all alike), and the
median round is reported with its ratio to bf16 ``F.linear`` of the same run.

Paths: bf16 ``F.linear``; ComfyUI's own bf16 ``Linear`` (``comfy.ops.disable_weight_init`` and ``manual_cast``) where
``COMFYUI_DIR`` points at a ComfyUI checkout; ours (a ComfyUI-style ``Linear`` loaded through the pack's operations
class, on ComfyUI's own base class where available): auto on a bf16 weight after calibration (static scale), dynamic
per-token, an fp8 weight, int8_rotated.

Usage: python bench/bench_linear_host.py [--json PATH] [--rounds 7] [--smoke]  (``--smoke``: tiny sizes, any device)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_linear import queued_ms  # this folder (the scripts run from it)

from fp8_quant import Fp8Recipe, UserOptions
from fp8_quant.config import Fp8Config
from fp8_quant.fp8_utils import quantize_weight
from fp8_quant.kernels.scaled_mm import one_launch_work, triton_gemm_work
from fp8_quant.scheme import PER_CHANNEL
from fp8_quant.testing import random_linear
from nodes.comfy_ops import LoadPlan, make_fp8_operations

WIDTHS = (3072, 5120)
ROWS = (1, 256)


class PlainOps:
    """Stands in for ``comfy.ops.disable_weight_init`` without ComfyUI: torch's own forward."""

    class Linear(nn.Linear):
        weight_function: list = []  # noqa: RUF012 (as ComfyUI's: empty unless lowvram patches it)
        bias_function: list = []  # noqa: RUF012

        def reset_parameters(self) -> None:
            return None


def comfy_ops():
    """ComfyUI's operations classes where ``COMFYUI_DIR`` is set: ``(disable_weight_init, manual_cast)``."""
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        return None
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
    from comfy_runtime import setup_comfy

    setup_comfy()
    import comfy.ops

    return comfy.ops.disable_weight_init, comfy.ops.manual_cast


def our_layer(base, width: int, device: str, options: UserOptions, fp8_file: bool = False) -> nn.Module:
    """A ComfyUI-style ``Linear`` loaded through the pack's operations class, on ``device``."""
    source = random_linear(width, width, seed=1)
    weight, bias = source.weight.detach(), source.bias.detach().to(torch.bfloat16)
    state = {"layer.weight": weight.to(torch.bfloat16), "layer.bias": bias}
    file_config = None
    if fp8_file:
        stored, scale = quantize_weight(weight, group=PER_CHANNEL)
        state = {"layer.weight": stored, "layer.weight_scale": scale, "layer.bias": bias}
        file_config = Fp8Config()
    plan = LoadPlan(Fp8Recipe.for_checkpoint(file_config, options), result_device=device)
    holder = nn.Module()
    holder.layer = make_fp8_operations(base, plan).Linear(width, width, dtype=torch.bfloat16)
    holder.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False)
    plan.prepare_kernels(holder, torch.device(device))
    return holder.layer


def calibrate(layer: nn.Module, width: int, device: str) -> None:
    """Calls on even tokens until a learning layer has decided (the decision waits for a copy to the host)."""
    generator = torch.Generator(device=device).manual_seed(3)
    for _ in range(8):
        layer(torch.randn(64, width, generator=generator, device=device).to(torch.bfloat16))
        if device == "cuda":
            torch.cuda.synchronize()


def time_us(fn: Callable[[], object], reps: int, device: str) -> float:
    """us per call, ``reps`` calls queued back to back."""
    if device == "cuda":
        return queued_ms(fn, reps) * 1000
    begin = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - begin) * 1e6 / reps


def paths(width: int, device: str, comfy) -> dict[str, nn.Module | Callable]:
    base = comfy[0] if comfy else PlainOps
    weight = random_linear(width, width, seed=1).to(device, torch.bfloat16)
    found: dict[str, Callable] = {"bf16 F.linear": lambda x: F.linear(x, weight.weight, weight.bias)}
    if comfy:
        for name, ops in zip(("ComfyUI disable_weight_init bf16", "ComfyUI manual_cast bf16"), comfy):
            stock = ops.Linear(width, width, dtype=torch.bfloat16, device=device)
            stock.weight, stock.bias = weight.weight, weight.bias
            found[name] = stock
    layers = {
        "ours auto static": our_layer(base, width, device, UserOptions()),
        "ours dynamic per-token": our_layer(base, width, device, UserOptions(activation_scheme="dynamic")),
        "ours fp8 weight": our_layer(base, width, device, UserOptions(), fp8_file=True),
        "ours int8_rotated": our_layer(base, width, device, UserOptions(quant_format="int8_rotated")),
    }
    for layer in layers.values():
        calibrate(layer, width, device)
    return {**found, **layers}


def run(widths, rows_list, rounds: int, reps: int, device: str, comfy) -> list[dict]:
    results = []
    for width in widths:
        table = paths(width, device, comfy)
        for rows in rows_list:
            x = torch.randn(rows, width, device=device).to(torch.bfloat16)
            times: dict[str, list[float]] = {name: [] for name in table}
            with torch.inference_mode():
                for fn in table.values():
                    time_us(lambda fn=fn, x=x: fn(x), 5, device)  # warm-up
                for _ in range(rounds):
                    for name, fn in table.items():
                        times[name].append(time_us(lambda fn=fn, x=x: fn(x), reps, device))
            bf16 = statistics.median(times["bf16 F.linear"])
            for name, values in times.items():
                us = statistics.median(values)
                results.append({"path": name, "width": width, "rows": rows, "us_per_call": us,
                                "x_bf16": us / bf16, "rounds_us": values})  # fmt: skip
                print(f"K=N={width:5d} rows={rows:4d} {name:34s} {us:8.1f} us  {us / bf16:5.2f}x bf16")
    return results


def host_parts(width: int, rows: int, device: str, base, rounds: int, reps: int) -> list[dict]:
    """What one call of ours costs the host, piece by piece (``--parts``): the pieces a prepared call runs, each
    queued on its own, beside bf16 ``F.linear``; and where the time of a whole call goes (cProfile, top lines)."""
    import cProfile
    import io
    import pstats

    from fp8_quant import quant_triton
    from fp8_quant.layer_state import layer_state

    fp8 = torch.float8_e4m3fn
    source = random_linear(width, width, seed=1).to(device)
    weight, bias = source.weight.detach().to(torch.bfloat16), source.bias.detach().to(torch.bfloat16)
    x = torch.randn(rows, width, device=device).to(torch.bfloat16)
    w8 = weight.to(fp8)
    x8 = x.to(fp8)
    row_a = torch.ones(rows, 1, device=device)
    row_b = torch.ones(1, width, device=device)
    one = torch.ones((), device=device)
    scale1 = torch.ones(1, device=device)
    rows_limit = one_launch_work[0]
    layer = our_layer(base, width, device, UserOptions())
    calibrate(layer, width, device)
    state = layer_state(layer)
    prepared = state.prepared
    quantizer = quant_triton.RowQuantizer(quant_triton.STATIC, torch.bfloat16, fp8, width, torch.device(device),
                                          row_scales=True)  # fmt: skip
    shared = quant_triton.RowQuantizer(quant_triton.STATIC, torch.bfloat16, fp8, width, torch.device(device),
                                       row_scales=True, scratch=True)  # fmt: skip
    buffers = (scale1, None, None, None)
    for launch in (quantizer, quantizer, shared, shared):
        launch(x, buffers)
    compiled = next(iter(quantizer.compiled.values()), None)
    grid = (-(-rows // quantizer.rows_per_program), 1, 1)
    q_out = torch.empty((rows, width), dtype=fp8, device=device)
    s_out = torch.empty((rows, 1), dtype=torch.float32, device=device)
    arguments = (x, q_out, s_out, *buffers, rows, width, width, width, quantizer.limit, quant_triton.AMAX_FLOOR,
                 quantizer.margin, *quantizer.constants)  # fmt: skip

    def raw_run():
        stream = torch._C._cuda_getCurrentRawStream(0)
        compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, None, None, None,
                     *arguments)  # fmt: skip

    def two_launches(product, x, weight):
        one_launch_work[0] = 0
        out = product(x, weight)
        one_launch_work[0] = rows_limit
        return out

    class Empty(nn.Module):
        def forward(self, x):
            return x

    empty_module = Empty()
    pieces: dict[str, Callable[[], object]] = {
        "bf16 F.linear": lambda: F.linear(x, weight, bias),
        "module call, empty forward": lambda: empty_module(x),
        "torch.empty fp8 [rows, K]": lambda: torch.empty((rows, width), dtype=fp8, device=device),
        "_scaled_mm rowwise, bias": lambda: torch._scaled_mm(x8, w8.t(), scale_a=row_a, scale_b=row_b, bias=bias,
                                                             out_dtype=torch.bfloat16, use_fast_accum=True),
        "_scaled_mm tensorwise, bias": lambda: torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one, bias=bias,
                                                                out_dtype=torch.bfloat16, use_fast_accum=True),
        "eager static quant (mul, clamp, to)": lambda: (x * 1.0).clamp_(-448.0, 448.0).to(fp8),
        "RowQuantizer static (2 empties + launch)": lambda: quantizer(x, buffers),
        "RowQuantizer static, shared outputs": lambda: shared(x, buffers),
        "compiled[grid](...) launch only": lambda: compiled[grid](*arguments),
        "compiled.run(...) raw launch only": raw_run,
        "prepared.product(x, w)": lambda: prepared.product(x, layer.weight),
        "prepared.product(x, w), two launches": lambda: two_launches(prepared.product, x, layer.weight),
        "prepared.serve checks + product": lambda: prepared.serve(layer, state, x, layer.bias),
        "layer(x) (ours auto static)": lambda: layer(x),
    }
    times: dict[str, list[float]] = {name: [] for name in pieces}
    with torch.inference_mode():
        for name, fn in pieces.items():
            try:
                time_us(fn, 5, device)
            except Exception as error:  # a piece this torch/Triton cannot run
                print(f"  {name}: {type(error).__name__}: {error}")
                times.pop(name)
        for _ in range(rounds):
            for name in times:
                times[name].append(time_us(pieces[name], reps, device))
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(2000):
            layer(x)
        profile.disable()
    if device == "cuda":
        torch.cuda.synchronize()
    stream = io.StringIO()
    pstats.Stats(profile, stream=stream).sort_stats("tottime").print_stats(18)
    print(stream.getvalue())
    results = []
    bf16 = statistics.median(times["bf16 F.linear"])
    for name, values in times.items():
        us = statistics.median(values)
        print(f"K=N={width:5d} rows={rows:4d} {name:42s} {us:8.1f} us  {us / bf16:5.2f}x bf16")
        results.append({"piece": name, "width": width, "rows": rows, "us_per_call": us, "x_bf16": us / bf16})
    return results


SWEEP_ROWS = (1, 16, 64, 128, 256, 512, 1024, 2048, 4096)
# (name, one-launch work limit, Triton GEMM work limit): each regime forced at every size
REGIMES = (("one launch", 1 << 62, 0), ("Triton GEMM", 0, 1 << 62), ("_scaled_mm", 0, 0))


def regime_sweep(widths, device: str, base, rounds: int, reps: int) -> list[dict]:
    """Where each of a prepared call's three paths pays: a layer's queued call (auto static, after calibration) at
    growing rows with the one launch, the row quantizer + Triton GEMM, or the row quantizer + ``_scaled_mm`` forced,
    in the same rounds; the work limits in ``kernels.scaled_mm`` come from where they cross."""
    limits = one_launch_work[0], triton_gemm_work[0]
    results = []
    try:
        for width in widths:
            # Both limits on while the layer makes its prepared call: a path is bound only where its limit is set.
            one_launch_work[0] = triton_gemm_work[0] = 1 << 62
            layer = our_layer(base, width, device, UserOptions())
            calibrate(layer, width, device)
            for rows in SWEEP_ROWS:
                x = torch.randn(rows, width, device=device).to(torch.bfloat16)
                times: dict[str, list[float]] = {name: [] for name, _, _ in REGIMES}
                with torch.inference_mode():
                    for _ in range(rounds + 1):
                        for name, one, triton_gemm in REGIMES:
                            one_launch_work[0], triton_gemm_work[0] = one, triton_gemm
                            times[name].append(time_us(lambda layer=layer, x=x: layer(x), reps, device))
                us = {name: statistics.median(values[1:]) for name, values in times.items()}
                print(f"K=N={width} rows={rows:5d} " + ", ".join(f"{k} {v:7.1f} us" for k, v in us.items()))
                results.append({"width": width, "rows": rows, **{f"{k} us": v for k, v in us.items()}})
    finally:
        one_launch_work[0], triton_gemm_work[0] = limits
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, few calls (a test that it runs)")
    parser.add_argument("--parts", action="store_true", help="also time the pieces of one of our calls")
    parser.add_argument("--sweep", action="store_true", help="also time a call's three paths at growing rows")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="comma-separated row counts")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    comfy = comfy_ops()
    widths, rows, rounds, reps = (WIDTHS, tuple(map(int, args.rows.split(","))), max(5, args.rounds), args.reps)
    if args.smoke:
        widths, rows, rounds, reps = (64,), (1, 8), 5, 3
    results = run(widths, rows, rounds, reps, device, comfy)
    parts = []
    if args.parts and device == "cuda":
        base = comfy[0] if comfy else PlainOps
        parts = [piece for count in rows for piece in host_parts(widths[0], count, device, base, rounds, reps)]
    if args.sweep and device == "cuda":
        base = comfy[0] if comfy else PlainOps
        parts += [{"sweep": True, **row} for row in regime_sweep(widths, device, base, rounds, max(20, reps // 4))]
    if args.json:
        meta = {
            "kind": "linear-host",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__,
            "comfyui": os.environ.get("COMFYUI_DIR"),
        }
        args.json.write_text(json.dumps({**meta, "results": results, **({"parts": parts} if parts else {})}, indent=1))


if __name__ == "__main__":
    main()
