"""The pack's 8-bit attention kernel beside torch's SDPA backends (and SageAttention where installed), at DiT shapes.

Per shape: ms (median over interleaved rounds, CUDA events), TFLOP/s (4·B·H·Nq·Nk·D), relative L2 error vs float32
SDPA on inputs with a K offset in a few channels and a mean in V's (as trained DiTs have); ``--sweep`` also times the
kernel's launch settings (block sizes, warps, stages) to choose ``LAUNCH``. Writes JSON (GPU, versions) to ``--json``.

Usage: python bench/bench_lowbit_attention.py [--sweep] [--json bench/results/lowbit-attention-h200.json]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import statistics
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fp8_quant import lowbit_attention as la
from fp8_quant.testing import rel_err

SHAPES = {
    # name: (batch, heads, query tokens, key tokens, head dim, dtype)
    "wan14b-480p": (1, 40, 14040, 14040, 128, torch.float16),
    "wan14b-720p": (1, 40, 32400, 32400, 128, torch.float16),
    "flux-1024px": (1, 24, 4608, 4608, 128, torch.bfloat16),
    "wan14b-480p-cross": (1, 40, 14040, 512, 128, torch.float16),
    "wan1.3b-320p": (1, 12, 3200, 3200, 128, torch.float16),
}
SDPA = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}
SWEEP = [
    (64, 128, 4, 2),
    (64, 128, 4, 3),
    (64, 128, 4, 4),
    (64, 64, 4, 3),
    (128, 64, 4, 3),
    (128, 64, 4, 4),
    (128, 128, 4, 3),
    (128, 128, 8, 3),
    (64, 128, 8, 3),
]


def inputs(b, h, n_q, n_k, d, dtype, seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, n_q, h, d, device="cuda", generator=generator).to(dtype).transpose(1, 2)
    k = torch.randn(b, n_k, h, d, device="cuda", generator=generator)
    channels = torch.randperm(d, device="cuda", generator=generator)[: d // 16]
    k[..., channels] += 4.0 * torch.randn(1, 1, h, channels.numel(), device="cuda", generator=generator).abs()
    v = torch.randn(b, n_k, h, d, device="cuda", generator=generator)
    v += 0.3 * torch.randn(1, 1, h, d, device="cuda", generator=generator)
    return q, k.to(dtype).transpose(1, 2), v.to(dtype).transpose(1, 2)


def candidates(shape_name: str) -> dict:
    paths = {name: (lambda q, k, v, backend=backend: _sdpa(q, k, v, backend)) for name, backend in SDPA.items()}
    try:
        import sageattention

        paths["sage-1.0.6"] = lambda q, k, v: sageattention.sageattn(q, k, v, is_causal=False, smooth_k=True)
    except Exception as error:  # not installed, or no kernel for this GPU
        print(f"sageattention: {error}", file=sys.stderr)
    for qk in la.QK_FORMATS:
        paths[f"ours-{qk}"] = lambda q, k, v, qk=qk: la.lowbit_attention(q, k, v, qk)
    paths["ours-int8-pv16"] = lambda q, k, v: la.lowbit_attention(q, k, v, "int8", pv="fp16")
    return paths


def _sdpa(q, k, v, backend):
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v)


def time_paths(paths: dict, args: tuple, rounds: int = 7, calls: int = 5) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in paths}
    for fn in paths.values():
        fn(*args)  # compile, autotune, warm
    torch.cuda.synchronize()
    for _ in range(rounds):
        for name, fn in paths.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn(*args)
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / calls)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--sweep", action="store_true", help="also time the kernel's launch settings")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": importlib.metadata.version("triton"),
        "date": datetime.date.today().isoformat(),
        "shapes": {},
    }
    for name in args.shapes:
        b, h, n_q, n_k, d, dtype = SHAPES[name]
        entry: dict = {"shape": [b, h, n_q, n_k, d, str(dtype)]}
        try:
            q, k, v = inputs(b, h, n_q, n_k, d, dtype)
            exact = _sdpa(q.float(), k.float(), v.float(), SDPBackend.EFFICIENT_ATTENTION)
            paths = candidates(name)
            errors = {}
            for path, fn in list(paths.items()):
                try:
                    errors[path] = rel_err(fn(q, k, v), exact)
                except Exception as error:
                    entry.setdefault("failed", {})[path] = f"{type(error).__name__}: {error}"[:300]
                    del paths[path]
            ms = time_paths(paths, (q, k, v))
            flops = 4 * b * h * n_q * n_k * d
            entry["paths"] = {
                path: {"ms": round(ms[path], 4), "tflops": round(flops / ms[path] / 1e9, 1), "rel_err": errors[path]}
                for path in ms
            }
            if "cudnn" in ms:
                entry["x_cudnn"] = {path: round(ms["cudnn"] / ms[path], 3) for path in ms}
            if args.sweep:
                saved = dict(la.LAUNCH)
                sweep = {}
                for setting in SWEEP:
                    la.LAUNCH[d] = setting
                    try:
                        ours = {"int8": lambda q, k, v: la.lowbit_attention(q, k, v)}
                        sweep[str(setting)] = time_paths(ours, (q, k, v), 3, 3)["int8"]
                    except Exception as error:
                        sweep[str(setting)] = f"{type(error).__name__}: {error}"[:200]
                la.LAUNCH.clear()
                la.LAUNCH.update(saved)
                entry["sweep_ms"] = sweep
                quant = time_paths({"quantize": lambda q, k, v: la.quantize_qkv(q, k, v)}, (q, k, v), 3, 3)
                entry["quantize_ms"] = round(quant["quantize"], 4)
            del q, k, v, exact
            torch.cuda.empty_cache()
        except Exception:
            entry["error"] = traceback.format_exc()[-2000:]
        result["shapes"][name] = entry
        print(json.dumps({name: entry}, indent=1), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
