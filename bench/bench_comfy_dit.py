"""End-to-end DiT benchmark inside a real ComfyUI (COMFYUI_DIR): one ``apply_model`` call of a Wan 2.1 or Flux.1
DiT at real width, every FP8 path side by side, error against the same model run by the stock loader in float32.

Paths: the stock ``UNETLoader`` in its default dtype (ComfyUI's choice: fp16 for Wan, bf16 for Flux on a recent GPU),
in ``fp8_e4m3fn`` and ``fp8_e4m3fn_fast``, and on fp8 files our ``convert`` wrote (comfy-quant: the newest ComfyUI's
``QuantizedTensor`` path with comfy-kitchen; comfy-scaled); Load FP8 DiT on the bf16 file (auto: per-layer scales
calibrated at the first calls), on the comfy-quant file, dynamic per-token, static, weight-only. ``--compile``
adds ComfyUI's own TorchCompileModel (inductor) on the stock default, ``fp8_e4m3fn_fast``, stock comfy-quant and ours.

The model is random (ComfyUI's ``WanModel`` / ``Flux``; fewer blocks than the real model where the preset says so:
each block is the same work), saved in bf16. Per path: ms per call (median of back-to-back rounds, after warm-up
calls that also let calibration finish), GiB the weights take on the GPU, load seconds, relative L2 error of the
output vs float32. Writes a JSON result with the GPU and the versions.

Usage (ComfyUI's Python, or any with ComfyUI's packages):
    COMFYUI_DIR=... python bench/bench_comfy_dit.py --preset wan14b-4layers [--compile] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))
sys.path.insert(0, str(REPO))

from bench_linear import bench_ms  # noqa: E402
from comfy_fixtures import flux_model, randomize_dit, wan_model, write_comfy_quantized  # noqa: E402
from comfy_runtime import import_pack, setup_comfy  # noqa: E402

PRESETS = {
    # name: (family, model sizes, latent shape)
    "wan14b-4layers": ("wan", {"dim": 5120, "ffn_dim": 13824, "num_heads": 40, "num_layers": 4}, (1, 16, 9, 60, 104)),
    "wan1.3b": ("wan", {"dim": 1536, "ffn_dim": 8960, "num_heads": 12, "num_layers": 30}, (1, 16, 9, 60, 104)),
    "flux-2d4s": (
        "flux",
        {"hidden_size": 3072, "num_heads": 24, "depth": 2, "depth_single_blocks": 4},
        (1, 16, 128, 128),
    ),
    # Short problems, where the host's launches set the pace: a 320x512x17 Wan 1.3B clip (3200 tokens) and a
    # 512x512 Flux image (1024 tokens).
    "wan1.3b-320p": ("wan", {"dim": 1536, "ffn_dim": 8960, "num_heads": 12, "num_layers": 30}, (1, 16, 5, 40, 64)),
    "flux-2d4s-512px": (
        "flux",
        {"hidden_size": 3072, "num_heads": 24, "depth": 2, "depth_single_blocks": 4},
        (1, 16, 64, 64),
    ),
    "wan-tiny": ("wan", {}, (1, 16, 2, 16, 16)),
    # 720p, 33 frames (32400 tokens): attention is most of the step
    "wan14b-4layers-720p": (
        "wan",
        {"dim": 5120, "ffn_dim": 13824, "num_heads": 40, "num_layers": 4},
        (1, 16, 9, 90, 160),
    ),
}
# The linear whose cost per call is timed alone on a short input (``linear_ms``), per family.
PROBE_LINEAR = {"wan": "blocks.0.self_attn.q", "flux": "double_blocks.0.img_attn.qkv"}
PROBE_ROWS = (1, 256)
BUILDERS = {"wan": wan_model, "flux": flux_model}


# --outliers: the traits of trained DiTs that decide 8-bit error (issue 21): output channels spread over two
# decades, OUTLIER_COLUMNS input columns of every block linear OUTLIER_FACTOR times larger, and MASSIVE_CHANNELS
# residual channels pushed to large values through each block's output biases.
OUTLIER_COLUMNS, OUTLIER_FACTOR = 16, 8.0
MASSIVE_CHANNELS, MASSIVE_BIAS = (7, 300, 1201, 2047), 40.0
OUTPUT_BIASES = {"wan": ("ffn.2.bias", "cross_attn.o.bias"), "flux": ("img_mlp.2.bias", "linear2.bias")}


def write_model(path: Path, family: str, sizes: dict, device: str = "cuda", outliers: bool = False) -> None:
    import comfy.ops
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = BUILDERS[family](comfy.ops.disable_weight_init, dtype=torch.bfloat16, device=device, **sizes)
    if outliers:
        randomize_dit(model, channel_spread=True, outlier_columns=OUTLIER_COLUMNS, outlier_factor=OUTLIER_FACTOR)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(OUTPUT_BIASES[family]) and param.shape[0] > max(MASSIVE_CHANNELS):
                    param[list(MASSIVE_CHANNELS)] = MASSIVE_BIAS
    else:
        randomize_dit(model, channel_spread=False)
    state = {f"model.diffusion_model.{k}": v.contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path))


def inputs_for(family: str, latent: tuple[int, ...], device):
    import torch

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(*latent, generator=generator).to(device)
    context = torch.randn(1, 512, 4096, generator=generator).to(device)
    extra = {}
    if family == "flux":
        pooled = torch.randn(1, 768, generator=generator).to(device)
        extra = {"y": pooled, "guidance": torch.tensor([3.5], device=device)}
    return x, torch.tensor([0.6], device=device), context, extra


def versions() -> dict:
    import torch

    result = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name()}
    for package in ("triton", "comfy-kitchen", "comfy-aimdo"):
        try:
            result[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            result[package] = None
    try:
        import comfyui_version

        result["comfyui"] = comfyui_version.__version__
    except ImportError:
        result["comfyui"] = None
    return result


EXACT_ACCUM = {"FP8_QUANT_FAST_ACCUM": "off"}


def paths_for(folder: Path, name: str, loader, compile_too: bool) -> dict[str, tuple[Callable, bool, dict]]:
    """Path name -> (load function, compile it, environment while it loads and runs)."""
    import comfy.sd
    import torch

    bf16 = str(folder / name)
    quant = str(folder / name.replace("_bf16", "_comfy_quant"))
    scaled = str(folder / name.replace("_bf16", "_comfy_scaled"))
    convrot = str(folder / name.replace("_bf16", "_int8_convrot"))  # written by ComfyUI's own QuantizedTensor

    def stock(path: str, **options):
        return lambda: comfy.sd.load_diffusion_model(path, model_options=options)

    def ours(file: str, **options):
        def load():
            output = loader.load(Path(file).name, **options)
            print("   ", output["ui"]["text"][0])
            return output["result"][0]

        return load

    def with_attention(load, override):
        """The stock loader's model with an attention override of its own (what a user would otherwise pick)."""

        def patched():
            patcher = load().clone()
            patcher.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
            return patcher

        return patched

    fast = {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True}
    paths = {
        "fp32 reference": (stock(bf16, dtype=torch.float32), False, {}),
        "stock default dtype": (stock(bf16), False, {}),
        "stock fp8_e4m3fn": (stock(bf16, dtype=torch.float8_e4m3fn), False, {}),
        "stock fp8_e4m3fn_fast": (stock(bf16, **fast), False, {}),
        "stock on our comfy-quant file": (stock(quant), False, {}),
        "stock on our comfy-scaled file": (stock(scaled), False, {}),
        "ours auto (bf16 file)": (ours(bf16), False, {}),
        "ours auto, exact accumulation (bf16 file)": (ours(bf16), False, EXACT_ACCUM),
        "ours auto (comfy-quant file)": (ours(quant), False, {}),
        "ours auto, no CUDA graphs (bf16 file)": (ours(bf16, cuda_graphs="off"), False, {}),
        "ours auto, no CUDA graphs (comfy-quant file)": (ours(quant, cuda_graphs="off"), False, {}),
        "ours dynamic per-token": (ours(bf16, activation_scheme="dynamic"), False, {}),
        "ours static": (ours(bf16, activation_scheme="static"), False, {}),
        "ours weight-only": (ours(bf16, activation_scheme="none"), False, {}),
        "stock on an INT8-ConvRot file": (stock(convrot), False, {}),
        "ours on an INT8-ConvRot file": (ours(convrot), False, {}),
        "ours int8_rotated (bf16 file)": (ours(bf16, quant_format="int8_rotated"), False, {}),
        "ours int8_rotated, group scales (bf16 file)": (
            ours(bf16, quant_format="int8_rotated", activation_granularity="group"), False, {}
        ),
        "ours auto, ComfyUI's attention (bf16 file)": (ours(bf16, attention="comfy"), False, {}),
        "ours auto, 8bit attention (bf16 file)": (ours(bf16, attention="8bit"), False, {}),
        "stock on our comfy-quant file, cuDNN first": (with_attention(stock(quant), cudnn_first), False, {}),
        "stock on our comfy-quant file, SageAttention": (with_attention(stock(quant), sage_attention), False, {}),
    }
    if compile_too:
        paths.update(
            {
                "stock default dtype +compile": (stock(bf16), True, {}),
                "stock fp8_e4m3fn_fast +compile": (stock(bf16, **fast), True, {}),
                "stock on our comfy-quant file +compile": (stock(quant), True, {}),
                "ours auto (bf16 file) +compile": (ours(bf16), True, {}),
                "ours auto, 8bit attention (bf16 file) +compile": (ours(bf16, attention="8bit"), True, {}),
            }
        )
    return paths


def cudnn_first(func, *args, **kwargs):
    """ComfyUI's own attention with cuDNN moved before FlashAttention in its SDPA priority list."""
    import comfy.ops
    from torch.nn.attention import SDPBackend

    saved = list(comfy.ops.SDPA_BACKEND_PRIORITY)
    comfy.ops.SDPA_BACKEND_PRIORITY[:] = [
        SDPBackend.CUDNN_ATTENTION,
        *(b for b in saved if b != SDPBackend.CUDNN_ATTENTION),
    ]
    try:
        return func(*args, **kwargs)
    finally:
        comfy.ops.SDPA_BACKEND_PRIORITY[:] = saved


def sage_attention(func, *args, **kwargs):
    """ComfyUI's SageAttention path (what --use-sage-attention selects), needing the sageattention package."""
    import comfy.ldm.modules.attention as attention

    if not getattr(attention, "SAGE_ATTENTION_IS_AVAILABLE", False):
        import sageattention  # raises where it is not installed: the path fails with that reason

        attention.sageattn = sageattention.sageattn
        attention.SAGE_ATTENTION_IS_AVAILABLE = True
    return attention.attention_sage(*args, **kwargs)


def accumulation_choices() -> list[dict]:
    """The fast-accumulation choices this path's GEMMs made (``fp8_quant.kernels.fast_accum``)."""
    from fp8_quant.kernels import fast_accum

    return [
        {"kernel": key[0], "mkn": list(key[1:4]), "dtype": str(key[4]).removeprefix("torch."), "fast": fast}
        for key, fast in fast_accum.decisions().items()
    ]


def compiled(patcher):
    """What ComfyUI's TorchCompileModel node does (inductor, its guard filter), as users put it before the sampler
    (the node's module itself needs PyAV, which a benchmark machine may not have)."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    def skip_torch_compile_dict(guard_entries):
        return [("transformer_options" not in entry.name) for entry in guard_entries]

    clone = patcher.clone(disable_dynamic=True) if _takes_disable_dynamic(patcher.clone) else patcher.clone()
    set_torch_compile_wrapper(model=clone, backend="inductor", options={"guard_filter_fn": skip_torch_compile_dict})
    return clone


def _takes_disable_dynamic(function) -> bool:
    import inspect

    return "disable_dynamic" in inspect.signature(function).parameters


def run_path(load, compile_it: bool, inputs, warmup: int) -> dict:
    import comfy.model_management
    import torch

    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()
    before = torch.cuda.memory_allocated()
    started = time.perf_counter()
    with torch.inference_mode():  # as ComfyUI runs its nodes: the model's tensors are inference tensors
        patcher = load()
        comfy.model_management.load_models_gpu([patcher])
    torch.cuda.synchronize()
    load_s = time.perf_counter() - started
    weights = torch.cuda.memory_allocated() - before
    if compile_it:
        patcher = compiled(patcher)
    x, t, context, extra = inputs
    # As ComfyUI's sampler does (sampler_helpers): the patcher's wrappers (torch.compile's among them) join the
    # transformer options that apply_model reads.
    options = dict(patcher.model_options.get("transformer_options", {}))
    options["wrappers"] = getattr(patcher, "wrappers", {})
    model = patcher.model

    def step():
        with torch.inference_mode():
            return model.apply_model(x, t, c_crossattn=context, transformer_options=options, **extra)

    breaks_before, graphs_before = _dynamo_counts()
    started = time.perf_counter()
    for _ in range(warmup):  # compiles where asked; lets calibrated layers decide their scales
        step()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - started
    out = step().float()
    gc.collect()
    gc.disable()  # a collection in the middle of a host-bound step (few tokens) would be timed as the path's
    try:
        ms = bench_ms(step, warmup=1, reps=3, rounds=7)
    finally:
        gc.enable()
    row = {"out": out, "ms": ms, "weights_gib": weights / 2**30, "load_s": load_s, "warmup_s": warm_s}
    if not compile_it:
        row["linear_ms"] = probe_linear(model, step)
    if compile_it:
        breaks, graphs = _dynamo_counts()
        row.update(graph_breaks=breaks - breaks_before, compiled_graphs=graphs - graphs_before)
    return row


def probe_linear(model, step) -> dict[str, float]:
    """ms per call of one of the model's linears on ``PROBE_ROWS`` rows, calls queued back to back: at so few rows
    the GPU waits for the host, so this is the path's host cost per linear (what a short problem, a modulation
    linear or a text encoder pays on every layer). The input has the dtype and device the layer saw in a step."""
    import torch

    family = "flux" if hasattr(model.diffusion_model, "double_blocks") else "wan"
    linear = model.diffusion_model.get_submodule(PROBE_LINEAR[family])
    seen = []
    hook = linear.register_forward_pre_hook(lambda module, args: seen.append(args[0]) if not seen else None)
    try:
        step()
    finally:
        hook.remove()
    generator = torch.Generator(device=seen[0].device).manual_seed(2)
    times = {}
    for rows in PROBE_ROWS:
        x = torch.randn(rows, seen[0].shape[-1], generator=generator, device=seen[0].device).to(seen[0].dtype)
        with torch.inference_mode():
            times[f"rows={rows}"] = bench_ms(lambda x=x: linear(x), warmup=5, reps=100, rounds=5)
    return times


def _dynamo_counts() -> tuple[int, int]:
    """Graph breaks and compiled graphs so far (torch._dynamo's counters)."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


def bench_model(preset: str, dynamic_vram: bool = False, outliers: bool = False) -> tuple[Path, str, object]:
    """ComfyUI set up (with its dynamic VRAM where asked and available), the preset's random bf16 model written to a
    new models folder: (folder, file name, the pack's Load FP8 DiT node)."""
    family, sizes, _ = PRESETS[preset]
    folder = Path(tempfile.mkdtemp(prefix="fp8_bench_"))
    name = f"{preset}_bf16.safetensors"
    started = time.perf_counter()
    if dynamic_vram:  # comfy-aimdo starts before anything of ComfyUI's, and its operations build weights lazily
        command = [sys.executable, __file__, "--preset", preset, "--write-model", str(folder / name)]
        subprocess.run(command + (["--outliers"] if outliers else []), check=True)
        if not setup_comfy(dynamic_vram=True):
            raise SystemExit("--dynamic-vram: comfy-aimdo did not start")
    else:
        setup_comfy()
        write_model(folder / name, family, sizes, outliers=outliers)
    print(f"model {preset} ({family} {sizes}) written in {time.perf_counter() - started:.1f}s")
    import folder_paths

    pack = import_pack(REPO)
    folder_paths.add_model_folder_path("diffusion_models", str(folder))
    return folder, name, pack.NODE_CLASS_MAPPINGS["LoadFP8DiT"]()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", choices=list(PRESETS), default="wan14b-4layers")
    parser.add_argument("--compile", action="store_true", help="also ComfyUI's TorchCompileModel (inductor) paths")
    parser.add_argument("--only", default="", help="comma-separated substrings: run only paths that match")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--dynamic-vram",
        action="store_true",
        help="ComfyUI's dynamic VRAM on (what its main.py turns on by default on NVIDIA GPUs); off by default",
    )
    parser.add_argument("--repeat", type=int, default=1, help="passes over all paths (median per path)")
    parser.add_argument("--write-model", type=Path, help=argparse.SUPPRESS)  # the model file only (a subprocess)
    parser.add_argument("--outliers", action="store_true", help="a model with trained DiTs' outlier traits")
    args = parser.parse_args()
    if args.write_model:
        setup_comfy()
        family, sizes, _ = PRESETS[args.preset]
        write_model(args.write_model, family, sizes, outliers=args.outliers)
        return

    choices = logging.getLogger("fp8_quant.kernels.fast_accum")  # each timed GEMM's numbers, in the log
    choices.setLevel(logging.INFO)
    choices.addHandler(logging.StreamHandler(sys.stdout))
    folder, name, loader = bench_model(args.preset, args.dynamic_vram, args.outliers)
    import comfy.model_management
    import torch

    from fp8_quant.formats import convert_checkpoint

    family, sizes, latent = PRESETS[args.preset]
    for output_format in ("comfy-quant", "comfy-scaled"):
        target = folder / name.replace("_bf16", "_" + output_format.replace("-", "_"))
        convert_checkpoint(folder / name, target, output_format, device="cuda")
    if not args.only or any(word in "INT8-ConvRot file" for word in args.only.split(",")):
        started = time.perf_counter()
        write_comfy_quantized("int8_convrot", str(folder / name), str(folder / name.replace("_bf16", "_int8_convrot")))
        print(f"INT8-ConvRot file written by ComfyUI in {time.perf_counter() - started:.1f}s")
    device = comfy.model_management.get_torch_device()
    inputs = inputs_for(family, latent, device)
    meta = {"preset": args.preset, "family": family, "sizes": sizes, "latent": list(latent), **versions()}
    meta["dynamic_vram"] = args.dynamic_vram
    meta["outliers"] = args.outliers
    meta["passes"] = args.repeat
    meta["date"] = datetime.date.today().isoformat()
    print(json.dumps(meta))
    only = [word for word in args.only.split(",") if word]
    results: dict[str, dict] = {}
    reference = None
    from fp8_quant.kernels import fast_accum

    paths = paths_for(folder, name, loader, args.compile)
    chosen = [key for key in paths if not only or key == "fp32 reference" or any(word in key for word in only)]
    # Several passes over all paths, each path's time the median of its passes: where the host sets the pace (few
    # tokens), a VM's host speed drifts by tens of % within minutes, and interleaving spreads that over every path.
    for repeat in range(args.repeat):
        for path_name in chosen:
            load, compile_it, env = paths[path_name]
            if "error" in results.get(path_name, {}):
                continue
            fast_accum.forget()  # each path times its own GEMMs, as a fresh ComfyUI process would
            try:
                with mock.patch.dict(os.environ, env):  # the path's environment while it loads and runs
                    row = run_path(load, compile_it, inputs, warmup=6 if compile_it else 4)
                if path_name.startswith("ours") and fast_accum.decisions():
                    row["fast_accumulation"] = accumulation_choices()  # FP8_QUANT_FAST_ACCUM=auto's timed choices
            except Exception as error:  # a path that fails is reported, the others still run
                traceback.print_exc()
                results[path_name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
                print(f"{path_name:42s} FAILED {results[path_name]['error']}")
                continue
            out = row.pop("out")
            if reference is None:
                reference = out
            row["rel_err_vs_fp32"] = ((out - reference).norm() / reference.norm()).item()
            row = merge_repeats(results.get(path_name), row) if repeat else {**row, "ms_passes": [row["ms"]]}
            results[path_name] = row
            probe = " ".join(f"{k} {v * 1000:.0f}us" for k, v in row.get("linear_ms", {}).items())
            summary = f"{row['ms']:8.2f} ms  err {row['rel_err_vs_fp32']:.5f}  {row['weights_gib']:.2f} GiB"
            print(f"{path_name:42s} {summary}  {probe}")
            del out
            torch.cuda.empty_cache()
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps({**meta, "results": results}, indent=1))


def merge_repeats(earlier: dict, row: dict) -> dict:
    """One path's results after another pass: times per pass kept, ``ms`` (and each probe) their median."""
    import statistics

    merged = {**earlier, "ms_passes": [*earlier["ms_passes"], row["ms"]]}
    merged["ms"] = statistics.median(merged["ms_passes"])
    if "linear_ms" in row:
        passes = merged.setdefault("linear_ms_passes", {key: [value] for key, value in earlier["linear_ms"].items()})
        for key, value in row["linear_ms"].items():
            passes[key].append(value)
        merged["linear_ms"] = {key: statistics.median(values) for key, values in passes.items()}
    return merged


def print_table(results: dict[str, dict]) -> None:
    rows = {key: value for key, value in results.items() if "ms" in value}
    stock_quant = rows.get("stock on our comfy-quant file")
    header = ("ms/call", "x stock", "x quant", "err vs fp32", "GiB", "load s")
    print(f"{'path':42s} " + " ".join(f"{title:>11s}" for title in header))
    stock = rows.get("stock default dtype")
    for key, row in rows.items():
        speed = stock["ms"] / row["ms"] if stock else float("nan")
        quant = stock_quant["ms"] / row["ms"] if stock_quant else float("nan")
        values = (row["ms"], speed, quant, row["rel_err_vs_fp32"], row["weights_gib"], row["load_s"])
        print(f"{key:42s} " + " ".join(f"{value:11.4f}" for value in values))


if __name__ == "__main__":
    main()
