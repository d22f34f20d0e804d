"""Text-encoder benchmark inside a real ComfyUI (COMFYUI_DIR): a random T5-XXL (the encoder of Flux, SD3, Wan's
UMT5 is the same shape) loaded through ComfyUI's own text-encoder loader, encoding one prompt, in one process:

- bf16 weights (a bf16 file);
- ComfyUI's fp8: the same file cast to fp8 (``t5xxl_fp8_e4m3fn.safetensors``), which ComfyUI keeps in fp8 and
  upcasts per layer;
- Quantize Text Encoder (FP8) on the bf16 encoder, each recipe: ``quality`` (the default: fitted on the built-in
  prompts, weight-only), ``speed`` (fp8 x fp8, the encoder replayed as CUDA graphs), ``plain`` (no fitting);
- Quantize Text Encoder (FP8) on the fp8 file's encoder (its fp8 weights used at unit scale).

Per path: GPU memory of the encoder's weights, time of one ``encode_from_tokens`` (median of rounds), relative
error of the conditioning against bf16, and the node's time to prepare the encoder. The issue's target: speed
<= 0.35x the bf16 encode time.

Usage: COMFYUI_DIR=... python bench/bench_comfy_te.py [--words 200] [--paths "ours speed,ours plain"] [--json FILE]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))

from bench_linear import bench_ms  # noqa: E402
from comfy_runtime import import_pack, setup_comfy  # noqa: E402


def random_t5xxl_state_dict() -> dict:
    """ComfyUI's T5-XXL keys and shapes (its own config), random weights made on the GPU, kept on the host."""
    import json

    import comfy.ops
    import comfy.text_encoders.t5
    import torch

    config_path = Path(comfy.text_encoders.t5.__file__).with_name("t5_config_xxl.json")
    config = json.loads(config_path.read_text())
    template = comfy.text_encoders.t5.T5(config, torch.bfloat16, "meta", comfy.ops.manual_cast)
    generator = torch.Generator(device="cuda").manual_seed(0)
    state = {}
    for key, value in template.state_dict().items():
        if "norm" in key:
            tensor = torch.ones(value.shape, device="cuda")
        else:
            gain = 0.3 if any(part in key for part in (".q.", ".k.")) else 0.7
            tensor = torch.randn(value.shape, device="cuda", generator=generator) * gain / value.shape[-1] ** 0.5
        state[key] = tensor.to(torch.bfloat16).cpu()
    return state


def cast_to_fp8(value):
    """What a ``t5xxl_fp8_e4m3fn.safetensors`` file holds: every tensor cast to fp8 (ComfyUI then keeps the
    encoder's weights in fp8 and upcasts them layer by layer)."""
    import torch

    return value.to(torch.float8_e4m3fn)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--words", type=int, default=200, help="prompt length in words (~1.3 T5 tokens each)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--paths",
        help="comma-separated subset of the paths to run (bf16 always runs first: it is the reference)",
    )
    args = parser.parse_args()

    setup_comfy()
    import comfy.model_management
    import comfy.sd
    import torch

    pack = import_pack(REPO)
    quantize = pack.NODE_CLASS_MAPPINGS["QuantizeTextEncoderFP8"]()
    started = time.perf_counter()
    bf16_state = random_t5xxl_state_dict()
    fp8_state = {key: cast_to_fp8(value) for key, value in bf16_state.items()}
    made_s = time.perf_counter() - started
    print(f"random T5-XXL made in {made_s:.1f}s; {torch.cuda.get_device_name()}")

    def load(state):
        return comfy.sd.load_text_encoder_state_dicts([dict(state)], clip_type=comfy.sd.CLIPType.SD3)

    prepare_s = {}

    def ours(state, name, recipe):
        clip = load(state)
        started = time.perf_counter()
        output = quantize.quantize(clip, recipe=recipe)
        torch.cuda.synchronize()
        prepare_s[name] = time.perf_counter() - started
        print(f"  {name}: prepared in {prepare_s[name]:.1f}s; " + output["ui"]["text"][0].splitlines()[0])
        return output["result"][0]

    paths = {
        "bf16": lambda: load(bf16_state),
        "ComfyUI fp8 file": lambda: load(fp8_state),
        "ours quality": lambda: ours(bf16_state, "ours quality", "quality"),
        "ours speed": lambda: ours(bf16_state, "ours speed", "speed"),
        "ours plain": lambda: ours(bf16_state, "ours plain", "plain"),
        "ours on fp8 file": lambda: ours(fp8_state, "ours on fp8 file", "plain"),
    }
    if args.paths:
        wanted = ["bf16", *(name.strip() for name in args.paths.split(",") if name.strip() != "bf16")]
        unknown = [name for name in wanted if name not in paths]
        if unknown:
            raise SystemExit(f"--paths: unknown {unknown}; known: {list(paths)}")
        paths = {name: paths[name] for name in wanted}
    words = ("a cinematic photo of a red fox jumping over a frozen river at dawn, " * 40).split()
    results, reference = {}, None

    def release() -> None:
        comfy.model_management.unload_all_models()
        gc.collect()
        comfy.model_management.soft_empty_cache()

    for name, make in paths.items():
        release()
        clip = make()
        release()  # the input encoder of our node is gone by now: what is measured is the encoder handed on
        before = torch.cuda.memory_allocated()
        comfy.model_management.load_models_gpu([clip.patcher], force_full_load=True)
        weights = torch.cuda.memory_allocated() - before
        tokens = clip.tokenize(" ".join(words[: args.words]))

        def encode(clip=clip, tokens=tokens):
            return clip.encode_from_tokens(tokens)

        out = encode().float()
        reference = out if reference is None else reference
        error = ((out - reference).norm() / reference.norm()).item()
        results[name] = (bench_ms(encode, warmup=2, reps=3, rounds=5), weights / 2**30, error)
        del clip, encode, out
    comfy.model_management.unload_all_models()
    base_ms = results["bf16"][0]
    fp8_ms = results.get("ComfyUI fp8 file", results["bf16"])[0]
    header = ("ms/encode", "time/bf16", "x ComfyUI fp8", "weights GiB", "rel err", "prepare s")
    print(f"{'path':20s} " + " ".join(f"{title:>13s}" for title in header))
    rows = {}
    for name, (ms, gib, error) in results.items():
        values = (ms, ms / base_ms, fp8_ms / ms, gib, error, prepare_s.get(name, 0.0))
        rows[name] = dict(zip(header, values))
        print(f"{name:20s} " + " ".join(f"{value:13.4f}" for value in values))
    if args.json:
        import json

        info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "words": args.words}
        Path(args.json).write_text(json.dumps({**info, "paths": rows}, indent=1))


if __name__ == "__main__":
    main()
