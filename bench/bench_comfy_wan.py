"""End-to-end benchmark inside a real ComfyUI (COMFYUI_DIR): a Wan 2.1 DiT step with the stock loader in bf16,
ComfyUI's own ``fp8_e4m3fn`` and ``fp8_e4m3fn_fast`` weight dtypes, and Load FP8 DiT (dynamic per-token, and
weight-only), in one process on one GPU.

The model is random, built with ComfyUI's ``WanModel`` at a real width (layers can be fewer than the real
model's: each block is the same work), saved as a bf16 safetensors file and loaded through each path the way
the nodes load it. Per path it prints the time of one ``apply_model`` call (median of back-to-back rounds,
CUDA events), the GPU memory the weights take, and the relative error of the output against bf16.

Usage (under ComfyUI's Python, or any with ComfyUI's packages):
    COMFYUI_DIR=... python bench/bench_comfy_wan.py [--preset wan1.3b|wan14b-4layers] [--frames 9] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))
sys.path.insert(0, str(REPO / "bench"))

from bench_linear import bench_ms  # noqa: E402
from comfy_fixtures import randomize_dit  # noqa: E402
from comfy_runtime import import_pack, setup_comfy  # noqa: E402

PRESETS = {
    # name: (dim, ffn_dim, heads, layers)
    "wan1.3b": (1536, 8960, 12, 30),
    "wan14b-4layers": (5120, 13824, 40, 4),
    "tiny": (256, 512, 2, 2),
}


def write_model(path: Path, dim: int, ffn_dim: int, heads: int, layers: int) -> None:
    import comfy.ops
    import torch
    from comfy.ldm.wan.model import WanModel
    from safetensors.torch import save_file

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = WanModel(
            model_type="t2v",
            dim=dim,
            ffn_dim=ffn_dim,
            num_heads=heads,
            num_layers=layers,
            operations=comfy.ops.disable_weight_init,
            dtype=torch.bfloat16,
            device="cuda",
        )
    randomize_dit(model, channel_spread=False)
    state = {f"model.diffusion_model.{k}": v.contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", choices=list(PRESETS), default="wan14b-4layers")
    parser.add_argument("--frames", type=int, default=9, help="latent frames (9 = 33 video frames)")
    parser.add_argument("--height", type=int, default=60, help="latent height (60 = 480 px)")
    parser.add_argument("--width", type=int, default=104, help="latent width (104 = 832 px)")
    parser.add_argument(
        "--lowvram-gib",
        type=float,
        default=None,
        help="load each model partially (ComfyUI's lowvram), with this many GiB of weights on the GPU",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    setup_comfy()
    import comfy.model_management
    import comfy.sd
    import folder_paths
    import torch

    pack = import_pack(REPO)
    dim, ffn_dim, heads, layers = PRESETS[args.preset]
    folder = Path(tempfile.mkdtemp(prefix="fp8_bench_"))
    path = folder / f"wan_{args.preset}_bf16.safetensors"
    started = time.perf_counter()
    write_model(path, dim, ffn_dim, heads, layers)
    written_s = time.perf_counter() - started
    print(f"model {args.preset}: dim {dim}, ffn {ffn_dim}, {layers} layers; written in {written_s:.1f}s")
    folder_paths.add_model_folder_path("diffusion_models", str(folder))
    loader = pack.NODE_CLASS_MAPPINGS["LoadFP8DiT"]()

    def ours(**options):
        output = loader.load(path.name, **options)
        print("  " + output["ui"]["text"][0])
        return output["result"][0]

    paths = {
        "bf16 (stock UNETLoader)": lambda: comfy.sd.load_diffusion_model(str(path)),
        "ComfyUI fp8_e4m3fn": lambda: comfy.sd.load_diffusion_model(
            str(path), model_options={"dtype": torch.float8_e4m3fn}
        ),
        "ComfyUI fp8_e4m3fn_fast": lambda: comfy.sd.load_diffusion_model(
            str(path), model_options={"dtype": torch.float8_e4m3fn, "fp8_optimizations": True}
        ),
        "ours dynamic per-token": ours,
        "ours weight-only": lambda: ours(activation_scheme="none"),
    }
    device = comfy.model_management.get_torch_device()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, args.frames, args.height, args.width, generator=generator).to(device, torch.bfloat16)
    context = torch.randn(1, 512, 4096, generator=generator).to(device, torch.bfloat16)
    timestep = torch.tensor([0.6], device=device)
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    print(f"input: latent {list(x.shape)} = {tokens} tokens, text 512 tokens; {torch.cuda.get_device_name()}")
    results = {}
    reference = None
    for name, load in paths.items():
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()
        before = torch.cuda.memory_allocated()
        started = time.perf_counter()
        patcher = load()
        if args.lowvram_gib is None:
            comfy.model_management.load_models_gpu([patcher])
        else:
            budget = int(args.lowvram_gib * 2**30)
            patcher.load(device, lowvram_model_memory=budget, force_patch_weights=False, full_load=False)
        torch.cuda.synchronize()
        load_s = time.perf_counter() - started
        weights = torch.cuda.memory_allocated() - before
        model = patcher.model

        def step(model=model):
            with torch.inference_mode():
                return model.apply_model(x, timestep, c_crossattn=context)

        out = step().float()
        if reference is None:
            reference = out
        error = ((out - reference).norm() / reference.norm()).item()
        ms = bench_ms(step, warmup=2, reps=3, rounds=5)
        results[name] = {"ms": ms, "weights_gib": weights / 2**30, "rel_err": error, "load_s": load_s}
        if args.lowvram_gib is not None:
            patcher.detach()
        del model, patcher, step, out
    comfy.model_management.unload_all_models()

    base = results["bf16 (stock UNETLoader)"]
    comfy_fast = results["ComfyUI fp8_e4m3fn_fast"]
    header = ("ms/step", "x bf16", "x fast", "weights GiB", "rel err", "load s")
    print(f"{'path':28s} " + " ".join(f"{title:>11s}" for title in header))
    for name, row in results.items():
        values = (
            row["ms"],
            base["ms"] / row["ms"],
            comfy_fast["ms"] / row["ms"],
            row["weights_gib"],
            row["rel_err"],
            row["load_s"],
        )
        print(f"{name:28s} " + " ".join(f"{value:11.4f}" for value in values))
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "tokens": tokens, "results": results}, indent=1))


if __name__ == "__main__":
    main()
