"""Benchmark the FP8 linear against bf16 and ComfyUI's own fp8 path, on the GPU, in one run.

For each shape (M x K x N) it times: bf16 ``F.linear``; raw ``_scaled_mm`` per-tensor and row-wise on
pre-quantized operands (the ceiling; row-wise also with fast accumulation, which our row-wise layers choose where
it is faster, ``fp8_quant/kernels/fast_accum.py``); ComfyUI's ``fp8_e4m3fn_fast`` linear (clamp, unit-scale cast,
per-tensor ``_scaled_mm``, as in ``comfy/ops.py``); and our layers (dynamic per-token and per-tensor,
with the fused Triton quantizer and with the eager one). Prints TFLOP/s, ratios and the relative error
vs a float32 reference. Inputs: N(0, 1) with K/256 outlier channels x20.

Usage: python bench/bench_linear.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fp8_quant import Fp8Config, Fp8OnlineLinearMethod
from fp8_quant.fp8_utils import quantize_input_dynamic, quantize_weight
from fp8_quant.quant_fp8 import DISABLE_TRITON_ENV
from fp8_quant.scheme import PER_CHANNEL, PER_TENSOR
from fp8_quant.testing import rel_err

SHAPES = [
    ("Flux qkv 1024px", 4608, 3072, 9216),
    ("Flux mlp-down 1024px", 4608, 12288, 3072),
    ("Wan14B attn 480p", 32760, 5120, 5120),
    ("T5-XXL wi, M=256", 256, 4096, 10240),
    ("T5-XXL wo, M=256", 256, 10240, 4096),
    ("T5-XXL attn, M=256", 256, 4096, 4096),
]


def bench_ms(fn, warmup: int = 10, reps: int = 50, rounds: int = 5) -> float:
    """Median over rounds of the mean time per call with calls queued back to back.

    That is the steady state of a model's forward, where the host runs ahead of the GPU; a lone call timed
    between two events would add the host's launch cost (tens of microseconds on the lent VM) to every
    kernel. Where the host is slower than the GPU (small M) this still shows it, as a real forward would.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = sorted(queued_ms(fn, reps) for _ in range(rounds))
    return times[len(times) // 2]


def queued_ms(fn, reps: int) -> float:
    """Mean ms per call of ``reps`` calls queued back to back, between two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def make_input(m: int, k: int, seed: int) -> torch.Tensor:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=generator)
    outliers = torch.randperm(k, device="cuda", generator=generator)[: max(1, k // 256)]
    x[:, outliers] *= 20
    return x.to(torch.bfloat16)


class Layer(torch.nn.Module):
    pass


def our_layer(weight: torch.Tensor, config: Fp8Config, kernel: str) -> tuple[Layer, Fp8OnlineLinearMethod]:
    layer = Layer()
    layer.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
    method = Fp8OnlineLinearMethod(config, kernel)
    method.process_weights_after_loading(layer, "bench")
    return layer, method


def comfy_fp8_fast(x: torch.Tensor, weight_fp8: torch.Tensor, scale_weight: torch.Tensor) -> torch.Tensor:
    """ComfyUI's fp8_linear (comfy/ops.py) without scale_input: clamp, cast at unit scale, per-tensor mm."""
    scale_input = torch.ones((), device=x.device, dtype=torch.float32)
    x = torch.clamp(x, min=-448, max=448)
    x8 = x.reshape(-1, x.shape[-1]).to(torch.float8_e4m3fn).contiguous()
    return torch._scaled_mm(x8, weight_fp8.t(), out_dtype=torch.bfloat16, scale_a=scale_input, scale_b=scale_weight)


def run_shape(name: str, m: int, k: int, n: int, quick: bool) -> list[dict]:
    torch.manual_seed(0)
    weight = (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16)
    x = make_input(m, k, seed=1)
    reference = x.float() @ weight.float().t()
    reps = 20 if quick else 50
    rows: list[dict] = []
    record = recorder(rows, name, (m, k, n), reference, reps)

    record("bf16 F.linear", lambda: F.linear(x, weight))
    w_tensor, s_tensor = quantize_weight(weight, group=PER_TENSOR)
    w_channel, s_channel = quantize_weight(weight, group=PER_CHANNEL)
    x_tensor, xs_tensor = quantize_input_dynamic(x, per_token=False)
    x_token, xs_token = quantize_input_dynamic(x, per_token=True)
    record(
        "raw _scaled_mm per-tensor",
        lambda: torch._scaled_mm(x_tensor, w_tensor.t(), scale_a=xs_tensor, scale_b=s_tensor, out_dtype=torch.bfloat16),
    )
    record(
        "raw _scaled_mm row-wise",
        lambda: torch._scaled_mm(
            x_token, w_channel.t(), scale_a=xs_token, scale_b=s_channel.view(1, -1), out_dtype=torch.bfloat16
        ),
    )
    record(
        "raw _scaled_mm row-wise, fast accumulation",
        lambda: torch._scaled_mm(
            x_token,
            w_channel.t(),
            scale_a=xs_token,
            scale_b=s_channel.view(1, -1),
            out_dtype=torch.bfloat16,
            use_fast_accum=True,
        ),
    )
    record("ComfyUI fp8_e4m3fn_fast", lambda: comfy_fp8_fast(x, w_tensor, s_tensor))
    variants = [
        ("ours dynamic per-token (triton)", Fp8Config(), "scaled_mm_rowwise", False),
        (
            "ours dynamic per-tensor (triton)",
            Fp8Config(weight_granularity="tensor", activation_granularity="tensor"),
            "scaled_mm_tensor",
            False,
        ),
        (
            "ours static per-tensor (learnt scale)",
            Fp8Config(weight_granularity="tensor", activation_scheme="static", activation_granularity="tensor"),
            None,
            False,
        ),
        ("ours dynamic per-token (eager quant)", Fp8Config(), "scaled_mm_rowwise", True),
        ("ours weight-only (dequant)", Fp8Config(activation_scheme="none"), "dequant", False),
    ]
    for label, config, kernel, eager in variants:
        if eager:
            os.environ[DISABLE_TRITON_ENV] = "1"
        else:
            os.environ.pop(DISABLE_TRITON_ENV, None)
        layer, method = our_layer(weight, config, kernel)
        record(label, lambda layer=layer, method=method: method.apply(layer, x))
    os.environ.pop(DISABLE_TRITON_ENV, None)
    torch.cuda.empty_cache()
    return rows


def recorder(rows: list[dict], name: str, mkn: tuple[int, int, int], reference: torch.Tensor, reps: int):
    """``record(label, fn)``: time ``fn`` and append its row (speed, relative error vs ``reference``) to ``rows``."""
    m, k, n = mkn

    def record(label: str, fn) -> None:
        ms = bench_ms(fn, reps=reps)
        row = {"shape": name, "mkn": [m, k, n], "method": label, "ms": ms, "tflops": 2.0 * m * k * n / ms / 1e9}
        rows.append({**row, "rel_err": rel_err(fn(), reference)})

    return record


def rows_by_shape(rows: list[dict]) -> dict[str, list[dict]]:
    by_shape: dict[str, list[dict]] = {}
    for row in rows:
        by_shape.setdefault(row["shape"], []).append(row)
    return by_shape


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'method':38s} {'ms':>8s} {'TFLOP/s':>8s} {'x bf16':>7s} {'x raw rw':>8s} {'x raw pt':>8s} {'x comfy':>8s} "
        f"{'rel err':>8s}"
    )
    for shape, shape_rows in rows_by_shape(rows).items():
        base = {r["method"]: r for r in shape_rows}
        bf16 = base["bf16 F.linear"]["ms"]
        raw = base["raw _scaled_mm row-wise"]["ms"]
        raw_tensor = base["raw _scaled_mm per-tensor"]["ms"]
        comfy = base["ComfyUI fp8_e4m3fn_fast"]["ms"]
        m, k, n = shape_rows[0]["mkn"]
        print(f"\n== {shape}  ({m}x{k}x{n})")
        print(header)
        for r in shape_rows:
            print(
                f"{r['method']:38s} {r['ms']:8.3f} {r['tflops']:8.0f} {bf16 / r['ms']:7.2f} {raw / r['ms']:8.2f} "
                f"{raw_tensor / r['ms']:8.2f} {comfy / r['ms']:8.2f} {r['rel_err']:8.4f}"
            )


def main() -> int:
    return run_benchmark(__doc__, run_shape, print_table)


def run_benchmark(doc: str, run: Callable[..., list[dict]], table: Callable[[list[dict]], None], check=None) -> int:
    """The command line every linear benchmark shares: ``--quick``, ``--json``, the device line, every shape of
    ``SHAPES`` through ``run``, then ``table``. ``check(device)``: ``None`` to go on, else why not (printed)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark runs on the GPU only")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False
    capability = torch.cuda.get_device_capability()
    print(f"device {torch.cuda.get_device_name()} capability {capability} torch {torch.__version__}")
    reason = check(torch.device("cuda", torch.cuda.current_device())) if check is not None else None
    if reason is not None:
        print(reason)
        return 1
    rows: list[dict] = []
    for name, m, k, n in SHAPES:
        rows.extend(run(name, m, k, n, args.quick))
    table(rows)
    if args.json:
        meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": str(datetime.date.today())}
        Path(args.json).write_text(json.dumps({**meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
