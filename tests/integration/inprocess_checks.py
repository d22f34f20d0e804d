"""In-process checks against ComfyUI's own classes; run by test_comfyui.py under COMFYUI_PYTHON.

Usage: python inprocess_checks.py text_encoder FAMILY [lora] [fp8|comfy_quant] [speed|plain] [dynamic]
       python inprocess_checks.py fit_cache FAMILY
       python inprocess_checks.py serve (checks as JSON lines on stdin: see ``serve``)
       python inprocess_checks.py lowvram MODEL | sampling MODEL [dynamic] | stock_sample SEED MODEL... OUT
       python inprocess_checks.py int8_layers MODEL | int8_compare BF16_MODEL CONVROT_MODEL | step_graphs MODEL
(prints one line ``RESULT {json}``). ``dynamic``: ComfyUI's dynamic VRAM on, as main.py has it on NVIDIA GPUs
(needs a GPU and comfy-aimdo).
ComfyUI's ``nodes`` module and this pack's ``nodes`` package share a name, so the pack is imported under a
package name of its own, as ComfyUI itself imports custom nodes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from comfy_runtime import import_pack as import_pack_from
from comfy_runtime import setup_comfy

REPO = Path(__file__).resolve().parents[2]


_PACK = []


def rel_err(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """The core's ``fp8_quant.testing.rel_err``, imported once the pack has put itself on the path."""
    from fp8_quant.testing import rel_err as core_rel_err

    return core_rel_err(actual, reference)


def import_pack():
    """The pack, imported once per process (a worker runs many checks; ComfyUI imports a pack once too)."""
    if not _PACK:
        _PACK.append(import_pack_from(REPO))
    return _PACK[0]


# The input CLIP encoding again after the node ran: bit-equal on a quiet machine, but a busy CPU's threaded GEMMs
# may sum in another order (seen once: ComfyUI 0.16.3's Gemma 2 under load). Far below what any fp8 rounding of
# the input's weights gives (~0.02 on these tiny encoders), so the check still fails if the node touches them.
ENCODE_AGAIN_BOUND = 1e-4


def check_text_encoder(family: str, with_lora: bool = False, storage: str = "bf16", recipe: str = "quality") -> dict:
    """The input CLIP keeps every tensor byte for byte and encodes as before; the fp8 copy encodes close to it.

    ``with_lora``: the input carries weight patches and has been used (so ComfyUI patched its weights in place):
    the copy must start from the unpatched weights and apply the patches itself.
    """
    from fp8_test_nodes import tiny_text_encoder

    from fp8_quant.layer_state import is_fp8_layer

    pack = import_pack()
    clip = tiny_text_encoder(family, storage=storage)
    tokens = clip.tokenize("a red fox jumps over the lazy dog, cinematic")
    extra = {}
    if with_lora:
        base = clip.encode_from_tokens(tokens)
        names = [n for n, m in clip.cond_stage_model.named_modules() if isinstance(m, torch.nn.Linear)]
        # Beside an LLM (HunyuanVideo) CLIP-L only gives the pooled vector: patch the model the conditioning is from.
        names = ([n for n in names if not n.startswith("clip_l.")] or names)[:6]
        clip = clip.clone()
        clip.add_patches(diff_patches(clip.cond_stage_model, "", names, 0.5, 11))
        extra["lora_effect"] = rel_err(clip.encode_from_tokens(tokens), base)
    before_classes = [type(m) for m in clip.cond_stage_model.modules()]
    reference, reference_pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    # Taken after ComfyUI's own first load of the input (which may cast or move its tensors), so that what is
    # compared is what the node did.
    before_state = {k: v.detach().clone() for k, v in clip.cond_stage_model.state_dict().items()}
    node = pack.NODE_CLASS_MAPPINGS["QuantizeTextEncoderFP8"]()
    output = node.quantize(clip, recipe=recipe)
    changed = changed_keys(before_state, clip.cond_stage_model.state_dict())
    new_clip = output["result"][0]
    quantized, quantized_pooled = new_clip.encode_from_tokens(tokens, return_pooled=True)
    changed_after_use = changed_keys(before_state, clip.cond_stage_model.state_dict())
    again, again_pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    unchanged = not changed and not changed_after_use
    drift = rel_err(again, reference)
    fp8_layers = sum(1 for m in new_clip.cond_stage_model.modules() if is_fp8_layer(m))
    result = {
        "rel_err": rel_err(quantized, reference),
        "input_unchanged": unchanged,
        "changed_by_node": changed[:5],
        "changed_after_copy_used": changed_after_use[:5],
        "input_classes_unchanged": before_classes == [type(m) for m in clip.cond_stage_model.modules()],
        "input_encodes_as_before": drift < ENCODE_AGAIN_BOUND,
        "input_encode_drift": drift,
        "fp8_layers": fp8_layers,
        "summary": output["ui"]["text"][0],
        "returned_input": new_clip is clip,
    }
    if reference_pooled is not None:
        result["pooled_rel_err"] = rel_err(quantized_pooled, reference_pooled)
        result["input_encodes_as_before"] &= rel_err(again_pooled, reference_pooled) < ENCODE_AGAIN_BOUND
    if storage == "bf16" and not with_lora and recipe == "quality":
        # ComfyUI's own --fp8_e4m3fn-text-enc: the same weights held as plain fp8 casts, upcast per layer.
        try:
            stock = tiny_text_encoder(family, storage="fp8")
            result["stock_fp8_rel_err"] = rel_err(stock.encode_from_tokens(tokens), reference)
        except (RuntimeError, NotImplementedError) as error:  # e.g. Gemma's norms cannot add to fp8 weights
            result["stock_fp8_failed"] = f"{type(error).__name__}: {error}"
    return {**result, **extra}


def check_fit_cache(family: str) -> dict:
    """The quality recipe's stored fit: a second load of the same encoder is not fitted again and encodes as the
    first copy did; the same encoder read at another layer (CLIP Set Last Layer) is fitted again."""
    import os

    from fp8_test_nodes import tiny_text_encoder

    pack = import_pack()
    node = pack.NODE_CLASS_MAPPINGS["QuantizeTextEncoderFP8"]()
    runs = []
    for layer in (None, None, -2):
        clip = tiny_text_encoder(family)
        if layer is not None:
            clip.clip_layer(layer)
        tokens = clip.tokenize("a red fox jumps over the lazy dog, cinematic")
        output = node.quantize(clip, recipe="quality")
        runs.append((output["ui"]["text"][0], output["result"][0].encode_from_tokens(tokens)))
    folder = Path(os.environ["FP8_QUANT_FIT_CACHE"])
    return {
        "summaries": [summary for summary, _ in runs],
        "second_equals_first": bool(torch.equal(runs[1][1], runs[0][1])),
        "stored": sorted(path.name for path in folder.glob("fit-*.safetensors")),
    }


def changed_keys(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    keys = sorted(before.keys() | after.keys())
    return [key for key in keys if key not in before or key not in after or not same_bytes(after[key], before[key])]


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.detach().cpu().reshape(-1).view(torch.uint8), b.detach().cpu().reshape(-1).view(torch.uint8))


def diff_patches(model, prefix: str, names: list[str], scale: float, seed: int) -> dict:
    """LoRA-like weight patches in ComfyUI's own format (``("diff", (delta,))``) for the given linears."""
    generator = torch.Generator().manual_seed(seed)
    patches = {}
    for name in names:
        weight = model.get_submodule(name).weight
        delta = torch.randn(weight.shape, generator=generator) * scale * weight.float().abs().mean().item()
        patches[f"{prefix}{name}.weight"] = ("diff", (delta,))
    return patches


def check_lowvram(model_path: str) -> dict:
    """A partial (lowvram) load gives the same output as a full load through ComfyUI's ModelPatcher, with and
    without weight patches (LoRA); on a GPU the partial load really leaves layers on the offload device."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.ops
    import comfy.sd

    pack = import_pack()
    loader = sys.modules["comfyui_fp8_quant.nodes.loader"]
    comfy_ops = sys.modules["comfyui_fp8_quant.nodes.comfy_ops"]
    from fp8_quant import Fp8Recipe, UserOptions
    from fp8_quant.formats import load_checkpoint
    from fp8_quant.layer_state import is_fp8_layer

    device = comfy.model_management.get_torch_device()

    def build():
        checkpoint = load_checkpoint(model_path)
        recipe = Fp8Recipe.for_checkpoint(None, UserOptions())
        plan = comfy_ops.LoadPlan(recipe, quantize_device=device if device.type == "cuda" else None)
        return loader.load_fp8_diffusion_model(checkpoint.state_dict, plan, device)

    targets = [f"blocks.{block}.{part}" for block in range(2) for part in ("self_attn.q", "self_attn.o", "ffn.0")]
    torch.manual_seed(1)
    x = torch.randn(1, 16, 1, 8, 8)
    timestep = torch.tensor([0.5])
    context = torch.randn(1, 8, 4096)
    results = {}
    for patched in (False, True):
        for mode in ("full", "lowvram"):
            patcher = build()
            dynamic = getattr(patcher, "is_dynamic", lambda: False)()
            if not isinstance(patcher, comfy.model_patcher.ModelPatcher) or dynamic:
                raise SystemExit(f"expected a classic ModelPatcher, got {type(patcher).__name__}")
            if patched:
                patcher.add_patches(diff_patches(patcher.model.diffusion_model, "diffusion_model.", targets, 0.5, 7))
            if mode == "full":
                patcher.load(device, lowvram_model_memory=0, force_patch_weights=True, full_load=True)
            else:
                patcher.load(device, lowvram_model_memory=64 * 1024, force_patch_weights=False, full_load=False)
            model = patcher.model
            with torch.no_grad():
                out = model.apply_model(x.to(device), timestep.to(device), c_crossattn=context.to(device))
            key = f"{mode}{'_patched' if patched else ''}"
            results[key] = out.float().cpu()
            fp8_layers = [m for m in model.modules() if is_fp8_layer(m)]
            results[key + "_fp8_layers"] = len(fp8_layers)
            results[key + "_cast_layers"] = sum(1 for m in fp8_layers if getattr(m, "comfy_cast_weights", False))
            results[key + "_offloaded_layers"] = sum(1 for m in fp8_layers if m.weight.device != device)
            patcher.detach()
    _ = pack
    return {
        "device": str(device),
        "rel_diff": rel_err(results["lowvram"], results["full"]),
        "rel_diff_patched": rel_err(results["lowvram_patched"], results["full_patched"]),
        "patch_effect": rel_err(results["full_patched"], results["full"]),
        **{key: value for key, value in results.items() if isinstance(value, int)},
    }


def check_operations(model_path: str) -> dict:
    """Which ComfyUI operations Load FP8 DiT builds around its fp8 layers: plain ones (no cast per call) where
    ComfyUI computes the model in the dtype it builds it in, weight-casting ones where ComfyUI would run it in
    another dtype (``unet_manual_cast`` gives one: a bf16-only model on an older GPU); both run, under
    ``torch.inference_mode`` as ComfyUI runs nodes, and agree."""
    from unittest import mock

    import comfy.model_management

    import_pack()
    loader = sys.modules["comfyui_fp8_quant.nodes.loader"]
    comfy_ops = sys.modules["comfyui_fp8_quant.nodes.comfy_ops"]
    from fp8_quant import Fp8Recipe, UserOptions
    from fp8_quant.formats import load_checkpoint
    from fp8_quant.layer_state import is_fp8_layer

    device = comfy.model_management.get_torch_device()
    torch.manual_seed(1)
    x, timestep, context = torch.randn(1, 16, 1, 8, 8), torch.tensor([0.5]), torch.randn(1, 8, 4096)
    results = {}
    for name, cast_to in (("plain", None), ("cast", torch.bfloat16)):

        def manual_cast(*args, cast_to=cast_to):
            return cast_to

        with torch.inference_mode(), mock.patch.object(comfy.model_management, "unet_manual_cast", manual_cast):
            checkpoint = load_checkpoint(model_path)
            plan = comfy_ops.LoadPlan(Fp8Recipe.for_checkpoint(None, UserOptions()))
            patcher = loader.load_fp8_diffusion_model(checkpoint.state_dict, plan, device)
            patcher.load(device, lowvram_model_memory=0, force_patch_weights=True, full_load=True)
            model = patcher.model
            out = model.apply_model(x.to(device), timestep.to(device), c_crossattn=context.to(device))
        others = [m for m in model.diffusion_model.modules() if hasattr(m, "comfy_cast_weights")]
        others = [m for m in others if not is_fp8_layer(m)]
        results[name] = {
            "out": out.float().cpu(),
            "casting_modules": sum(1 for m in others if m.comfy_cast_weights),
            "other_modules": len(others),
            "manual_cast_dtype": str(getattr(model, "manual_cast_dtype", None)),
        }
        patcher.detach()
    plain, cast = results["plain"], results["cast"]
    return {
        "device": str(device),
        "rel_diff": rel_err(cast["out"], plain["out"]),
        "finite": bool(plain["out"].isfinite().all() and cast["out"].isfinite().all()),
        **{f"{name}_{key}": value for name, row in results.items() for key, value in row.items() if key != "out"},
    }


def check_sampling(model_path: str) -> dict:
    """KSampler's sampling (``comfy.sample.sample``) on the same seed with the stock loader in bf16, ComfyUI's own
    fp8 weight dtypes (``fp8_e4m3fn`` and ``fp8_e4m3fn_fast``) and Load FP8 DiT (dynamic per-token, weight-only)."""
    import comfy.model_management
    import comfy.sample
    import comfy.sd
    import folder_paths

    pack = import_pack()
    folder_paths.add_model_folder_path("diffusion_models", str(Path(model_path).parent))
    name = Path(model_path).name
    loader = pack.NODE_CLASS_MAPPINGS["LoadFP8DiT"]()
    summaries = {}

    def ours(**options):
        output = loader.load(name, **options)
        summaries[options.get("activation_scheme", "auto")] = output["ui"]["text"][0]
        return output["result"][0]

    loaders = {
        "bf16": lambda: comfy.sd.load_diffusion_model(model_path),
        "stock_fp8": lambda: comfy.sd.load_diffusion_model(model_path, model_options={"dtype": torch.float8_e4m3fn}),
        "stock_fp8_fast": lambda: comfy.sd.load_diffusion_model(
            model_path, model_options={"dtype": torch.float8_e4m3fn, "fp8_optimizations": True}
        ),
        "ours": ours,
        "ours_weight_only": lambda: ours(activation_scheme="none"),
    }
    generator = torch.Generator().manual_seed(5)
    positive = [[torch.randn(1, 8, 4096, generator=generator), {}]]
    negative = [[torch.randn(1, 8, 4096, generator=generator), {}]]
    latent = torch.zeros(1, 16, 2, 16, 16)
    noise = comfy.sample.prepare_noise(latent, 42)
    outputs, patchers = {}, {}
    for key, load in loaders.items():
        model = load()
        patchers[key] = type(model).__name__
        outputs[key] = comfy.sample.sample(
            model, noise, 4, 2.0, "euler", "simple", positive, negative, latent, seed=42, disable_pbar=True
        ).float()
        comfy.model_management.unload_all_models()
        del model
    return {
        "device": str(comfy.model_management.get_torch_device()),
        "errors": {key: rel_err(value, outputs["bf16"]) for key, value in outputs.items() if key != "bf16"},
        "patchers": patchers,
        "summaries": summaries,
    }


def check_step_graphs(model_path: str) -> dict:
    """KSampler's sampling (CFG: cond + uncond in one batch) with Load FP8 DiT's step graphs on and off: the same
    latent, a second run with another latent shape, a run interrupted at its fourth step and one after it. Per
    run, the step graphs' counts; per comparison, the relative difference of the two latents."""
    import comfy.model_management
    import comfy.sample
    import folder_paths

    pack = import_pack()
    step_graphs = sys.modules["comfyui_fp8_quant.nodes.step_graphs"]
    folder_paths.add_model_folder_path("diffusion_models", str(Path(model_path).parent))
    loader = pack.NODE_CLASS_MAPPINGS["LoadFP8DiT"]()
    loaded = {key: loader.load(Path(model_path).name, cuda_graphs=key) for key in ("auto", "off")}
    models = {key: output["result"][0] for key, output in loaded.items()}
    graphs = step_graphs.step_graphs_of(models["auto"])
    generator = torch.Generator().manual_seed(5)
    positive = [[torch.randn(1, 8, 4096, generator=generator), {}]]
    negative = [[2.0 * torch.randn(1, 8, 4096, generator=generator), {}]]

    def sample(key: str, latent: torch.Tensor, callback=None) -> torch.Tensor:
        noise = comfy.sample.prepare_noise(latent, 42)
        return comfy.sample.sample(
            models[key], noise, 8, 2.0, "euler", "simple", positive, negative, latent, seed=42, disable_pbar=True,
            callback=callback,
        ).float()  # fmt: skip

    def interrupt(step, *args):
        if step == 3:
            raise comfy.model_management.InterruptProcessingException()

    runs, errors = {}, {}
    for name, latent in (("first", torch.zeros(1, 16, 2, 16, 16)), ("other_shape", torch.zeros(1, 16, 1, 8, 24))):
        graphed = sample("auto", latent)
        runs[name] = graphs.last_run
        errors[name] = rel_err(graphed, sample("off", latent))
    interrupted = False
    try:
        sample("auto", torch.zeros(1, 16, 2, 16, 16), callback=interrupt)
    except comfy.model_management.InterruptProcessingException:
        interrupted = True
    runs["interrupted"] = graphs.last_run
    after = sample("auto", torch.zeros(1, 16, 2, 16, 16))
    runs["after_interrupt"] = graphs.last_run
    errors["after_interrupt"] = rel_err(after, sample("off", torch.zeros(1, 16, 2, 16, 16)))
    comfy.model_management.unload_all_models()
    return {
        "device": str(comfy.model_management.get_torch_device()),
        "errors": errors,
        "runs": runs,
        "interrupted": interrupted,
        "summaries": {key: output["ui"]["text"][0] for key, output in loaded.items()},
    }


def check_int8_layers(model_path: str) -> dict:
    """Each block linear of an int8 file, stock (ComfyUI's own int8 layer, comfy-kitchen's kernels) and ours, on the
    same input: the input each stock layer saw in one forward of the stock model. Per layer, the relative
    difference of the outputs and the layer's error against its float values (the dequantized weight)."""
    import comfy.sd
    import folder_paths

    pack = import_pack()
    folder_paths.add_model_folder_path("diffusion_models", str(Path(model_path).parent))
    patchers = [  # held while the models run: a dropped patcher takes its model's weights with it
        comfy.sd.load_diffusion_model(model_path),
        pack.NODE_CLASS_MAPPINGS["LoadFP8DiT"]().load(Path(model_path).name)["result"][0],
    ]
    stock, ours = (patcher.model.diffusion_model for patcher in patchers)
    ours_layers = dict(ours.named_modules())
    inputs: dict[str, torch.Tensor] = {}
    hooks = []

    def keep_input(name: str):
        def hook(module, args, output) -> None:  # returns None: a hook's return value would replace the output
            inputs.setdefault(name, args[0].detach())

        return hook

    for name, module in stock.named_modules():
        if name.startswith("blocks.") and type(module).__name__.endswith("Linear"):
            hooks.append(module.register_forward_hook(keep_input(name)))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 1, 8, 8, generator=generator)
    context = torch.randn(2, 8, 4096, generator=generator)
    with torch.no_grad():
        stock(x, torch.tensor([500.0, 500.0]), context)
        stock_layers = dict(stock.named_modules())
        layers = {}
        for name, value in inputs.items():
            theirs, mine = stock_layers[name](value), ours_layers[name](value)
            real = stock_layers[name].weight.dequantize().float()
            exact = torch.nn.functional.linear(value.float(), real, stock_layers[name].bias.float())
            layers[name] = {"ours_vs_stock": rel_err(mine, theirs), "error": rel_err(theirs, exact)}
    for hook in hooks:
        hook.remove()
    return {"layers": layers, "formats": sorted({type(layer).__name__ for layer in stock_layers.values()})}


def compare_int8(bf16_path: str, convrot_path: str) -> dict:
    """Sampling error against the float model (ComfyUI computes in float32 on the CPU): Load FP8 DiT on the bf16 file
    with ``quant_format`` auto (the widget's default; on a CPU int8 rotated weights, activations unrounded), fp8 (what
    an API prompt without the input gets), int8 rotated and int8 rotated with group scales; the stock loader on
    ComfyUI's own INT8-ConvRot file and its ``fp8_e4m3fn`` cast. Two 64x64 latents, contexts of different magnitude
    (cond x1, uncond x3). Also the node's summary for auto."""
    import comfy.model_management
    import comfy.sample
    import comfy.sd
    import folder_paths

    pack = import_pack()
    folder_paths.add_model_folder_path("diffusion_models", str(Path(bf16_path).parent))
    loader = pack.NODE_CLASS_MAPPINGS["LoadFP8DiT"]()
    name = Path(bf16_path).name
    summaries = {}

    def ours(key: str, **options):
        loaded = loader.load(name, **options)
        summaries[key] = loaded["ui"]["text"][0]
        return loaded["result"][0]

    loaders = {
        "float": lambda: comfy.sd.load_diffusion_model(bf16_path),
        "stock_int8_convrot": lambda: comfy.sd.load_diffusion_model(convrot_path),
        "stock_fp8_e4m3fn": lambda: comfy.sd.load_diffusion_model(
            bf16_path, model_options={"dtype": torch.float8_e4m3fn}
        ),
        "ours_auto": lambda: ours("ours_auto", quant_format="auto"),
        "ours_fp8": lambda: ours("ours_fp8"),
        "ours_int8_rotated": lambda: ours("ours_int8_rotated", quant_format="int8_rotated"),
        "ours_int8_grouped": lambda: ours("ours_int8_grouped", quant_format="int8_rotated",
                                          activation_granularity="group"),
    }  # fmt: skip
    generator = torch.Generator().manual_seed(5)
    positive = [[torch.randn(1, 8, 4096, generator=generator), {}]]
    negative = [[3 * torch.randn(1, 8, 4096, generator=generator), {}]]
    latent = torch.zeros(2, 16, 1, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 42)
    outputs = {}
    for key, load in loaders.items():
        model = load()
        outputs[key] = comfy.sample.sample(
            model, noise, 8, 2.0, "euler", "simple", positive, negative, latent, seed=42, disable_pbar=True
        ).float()
        comfy.model_management.unload_all_models()
        del model
    errors = {key: rel_err(value, outputs["float"]) for key, value in outputs.items() if key != "float"}
    return {"errors": errors, "summaries": summaries}


def stock_samples(seed: int, model_paths: list[str], out_path: str) -> dict:
    """Each model through the stock loader (``comfy.sd.load_diffusion_model``) and KSampler's sampling with the server
    tests' default prompt (conditioning seeds 1 and 2, a 32x32 Wan latent, 4 euler steps, cfg 2) and ``seed``; the
    latents go to ``out_path``, so that a server run of another ComfyUI can be compared with this one's."""
    import comfy.model_management
    import comfy.sample
    import comfy.sd
    from safetensors.torch import save_file

    def conditioning(seed: int):
        return [[torch.randn(1, 8, 4096, generator=torch.Generator().manual_seed(seed)), {}]]

    latent = torch.zeros(1, 16, 1, 4, 4)
    noise = comfy.sample.prepare_noise(latent, seed)
    latents = {}
    for index, path in enumerate(model_paths):
        model = comfy.sd.load_diffusion_model(path)
        latents[f"latent{index}"] = comfy.sample.sample(
            model, noise, 4, 2.0, "euler", "simple", conditioning(1), conditioning(2), latent, seed=seed,
            disable_pbar=True,
        ).float().contiguous()
        comfy.model_management.unload_all_models()
        del model
    save_file(latents, out_path)
    import comfyui_version

    return {"version": comfyui_version.__version__, "models": len(model_paths)}


def run_check(argv: list[str]) -> dict:
    """One check, by its command-line words (``check [argument] [words...]``)."""
    check = argv[0]
    argument = argv[1] if len(argv) > 1 else None
    if check == "text_encoder":
        words = argv[2:]
        storage = next((word for word in words if word in ("fp8", "comfy_quant")), "bf16")
        recipe = next((word for word in words if word in ("speed", "plain")), "quality")
        return check_text_encoder(argument, with_lora="lora" in words, storage=storage, recipe=recipe)
    if check == "fit_cache":
        return check_fit_cache(argument)
    if check == "lowvram":
        return check_lowvram(argument)
    if check == "sampling":
        return check_sampling(argument)
    if check == "step_graphs":
        return check_step_graphs(argument)
    if check == "operations":
        return check_operations(argument)
    if check == "int8_compare":
        return compare_int8(argv[1], argv[2])
    if check == "int8_layers":
        return check_int8_layers(argument)
    if check == "stock_sample":
        return stock_samples(int(argv[1]), argv[2:-1], argv[-1])
    raise SystemExit(f"unknown check {check!r}")


def serve(dynamic: bool) -> None:
    """Checks one after another in this process (ComfyUI and torch imported once): one JSON request a line on stdin,
    ``{"argv": [...], "env": {...}}``; each answered with one line, ``RESULT {json}`` or ``FAILED {json text}``."""
    import os
    import traceback

    for line in sys.stdin:
        request = json.loads(line)
        os.environ.update(request.get("env", {}))
        try:
            answer = "RESULT " + json.dumps({**run_check(request["argv"]), "dynamic_vram": dynamic})
        except (Exception, SystemExit):  # reported to the test; the next check still runs
            answer = "FAILED " + json.dumps(traceback.format_exc()[-4000:])
        print(answer, flush=True)


if __name__ == "__main__":
    dynamic = setup_comfy(dynamic_vram="dynamic" in sys.argv[2:])
    if sys.argv[1] == "serve":
        serve(dynamic)
    else:
        print("RESULT " + json.dumps({**run_check(sys.argv[1:]), "dynamic_vram": dynamic}))
