"""Load / unload cycles of a DiT through Load FP8 DiT inside a real ComfyUI (COMFYUI_DIR), on a GPU.

Per cycle (options alternate: auto, dynamic, weight-only, and a lowvram partial load): load through the node, let
ComfyUI put it on the GPU (fully, or partially), run one step, unload, collect garbage. Measured:
- ``torch.cuda.memory_allocated()`` after each unload against the baseline before the first load (must return);
- the peak GPU memory while loading (before the model is moved to the GPU, i.e. what on-the-fly quantization
  stages there) against the fp8 model's bytes plus one bf16 layer;
- load seconds of the node (file to a ready model on the GPU) against the stock loader's on the bf16 file.
Writes a JSON result.

Usage: COMFYUI_DIR=... python bench/bench_load_cycles.py [--preset wan14b-4layers] [--cycles 20] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))
sys.path.insert(0, str(REPO))

from bench_comfy_dit import PRESETS, bench_model, inputs_for, versions  # noqa: E402

from fp8_quant.layer_state import is_fp8_layer  # noqa: E402

OPTION_CYCLE = (
    ("auto", {}, False),
    ("dynamic", {"activation_scheme": "dynamic"}, False),
    ("weight-only", {"activation_scheme": "none"}, False),
    ("auto lowvram", {}, True),
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", choices=list(PRESETS), default="wan14b-4layers")
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    folder, name, loader = bench_model(args.preset)
    import comfy.model_management
    import comfy.sd
    import torch

    family, _, latent = PRESETS[args.preset]
    device = comfy.model_management.get_torch_device()
    x, t, context, extra = inputs_for(family, latent, device)

    def step(patcher) -> None:
        with torch.inference_mode():
            patcher.model.apply_model(x, t, c_crossattn=context, **extra)
        torch.cuda.synchronize()

    def unload() -> None:
        comfy.model_management.unload_all_models()
        gc.collect()
        comfy.model_management.soft_empty_cache()
        torch.cuda.synchronize()

    def timed_load(load, lowvram: bool = False):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        patcher = load()
        staged_peak = torch.cuda.max_memory_allocated()  # before ComfyUI moves the model in
        if lowvram:
            budget = int(0.25 * 2**30)
            patcher.load(device, lowvram_model_memory=budget, force_patch_weights=False, full_load=False)
        else:
            comfy.model_management.load_models_gpu([patcher])
        torch.cuda.synchronize()
        return patcher, time.perf_counter() - started, staged_peak

    unload()
    stock_times = []
    for _ in range(3):
        patcher, seconds, _ = timed_load(lambda: comfy.sd.load_diffusion_model(str(folder / name)))
        stock_times.append(seconds)
        del patcher
        from fp8_quant.formats import load_checkpoint

    started = time.perf_counter()
    load_checkpoint(folder / name)
    read_s = time.perf_counter() - started  # the file read alone (page cache warm), the floor of any load
    unload()
    baseline = torch.cuda.memory_allocated()
    cycles = []
    for cycle in range(args.cycles):
        label, options, lowvram = OPTION_CYCLE[cycle % len(OPTION_CYCLE)]
        before = torch.cuda.memory_allocated()
        ours = lambda options=options: loader.load(name, **options)["result"][0]  # noqa: E731
        patcher, seconds, staged_peak = timed_load(ours, lowvram)
        fp8_bytes, largest_bf16 = _layer_bytes(patcher.model)
        step(patcher)
        if lowvram:
            patcher.detach()
        del patcher
        unload()
        after = torch.cuda.memory_allocated()
        cycles.append(
            {
                "cycle": cycle,
                "options": label,
                "load_s": seconds,
                "staged_peak_gib": (staged_peak - before) / 2**30,
                "fp8_model_gib": fp8_bytes / 2**30,
                "one_bf16_layer_gib": largest_bf16 / 2**30,
                "allocated_after_unload_minus_baseline_mib": (after - baseline) / 2**20,
            }
        )
        print(json.dumps(cycles[-1]))
    # The same lowvram cycle with the stock loader: what ComfyUI itself keeps on the GPU after a partial load (its
    # offload stream buffers) is not the pack's.
    before = torch.cuda.memory_allocated()
    patcher, _, _ = timed_load(lambda: comfy.sd.load_diffusion_model(str(folder / name)), lowvram=True)
    step(patcher)
    patcher.detach()
    del patcher
    unload()
    stock_lowvram_drift = (torch.cuda.memory_allocated() - before) / 2**20
    on_the_fly = [c["load_s"] for c in cycles if not c["options"].endswith("lowvram")]
    summary = {
        "file_read_s": read_s,
        "stock_bf16_load_s_median": statistics.median(stock_times),
        "ours_load_s_median": statistics.median(on_the_fly),
        "load_ratio": statistics.median(on_the_fly) / statistics.median(stock_times),
        "max_allocated_drift_mib": max(abs(c["allocated_after_unload_minus_baseline_mib"]) for c in cycles),
        # once each kind of load has run (one-time buffers: cuBLAS workspace, ComfyUI's offload buffers), nothing grows
        "growth_after_first_round_mib": max(c["allocated_after_unload_minus_baseline_mib"] for c in cycles)
        - cycles[min(len(cycles), len(OPTION_CYCLE)) - 1]["allocated_after_unload_minus_baseline_mib"],
        "stock_lowvram_cycle_drift_mib": stock_lowvram_drift,
        "max_staged_peak_over_bound": max(
            c["staged_peak_gib"] / (1.05 * c["fp8_model_gib"] + c["one_bf16_layer_gib"]) for c in cycles
        ),
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        meta = {"preset": args.preset, "cycles": args.cycles, **versions()}
        result = {**meta, "summary": summary, "stock_load_s": stock_times, "runs": cycles}
        args.json.write_text(json.dumps(result, indent=1))


def _layer_bytes(model) -> tuple[int, int]:
    """The fp8 model's linear bytes (weights and scales) and the largest linear weight's bf16 bytes."""
    fp8_bytes = largest = 0
    for module in model.modules():
        if is_fp8_layer(module):
            fp8_bytes += module.weight.numel() * module.weight.element_size() + module.weight_scale.numel() * 4
            largest = max(largest, module.weight.numel() * 2)
    return fp8_bytes, largest


if __name__ == "__main__":
    main()
