"""Integration tests in a real ComfyUI (COMFYUI_DIR): API prompts through a server, and in-process checks.

Skipped with a clear reason when COMFYUI_DIR is unset (CI has no ComfyUI).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import COMFYUI_DIR, COMFYUI_PYTHON, REPO, SKIP_REASON, write_fixture
from safetensors.torch import load_file, save_file

from fp8_quant.formats import convert_checkpoint
from fp8_quant.scheme import PER_CHANNEL

pytestmark = [pytest.mark.comfyui, pytest.mark.skipif(not COMFYUI_DIR, reason=SKIP_REASON)]

SEED = 42


def rel_err(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return ((actual.double() - reference.double()).norm() / reference.double().norm()).item()


@pytest.fixture(scope="module")
def tiny_wan(comfyui) -> str:
    folder = comfyui.models / "diffusion_models"
    bf16 = write_fixture("wan", folder / "tiny_wan_bf16.safetensors")
    convert_checkpoint(bf16, folder / "tiny_wan_fp8_scaled.safetensors", "comfy-scaled")
    convert_checkpoint(bf16, folder / "tiny_wan_fp8_quant.safetensors", "comfy-quant")
    convert_checkpoint(bf16, folder / "tiny_wan_fp8_channel.safetensors", "weight-scale", weight_group=PER_CHANNEL)
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    scaled = load_file(str(folder / "tiny_wan_fp8_scaled.safetensors"))
    nan_scale = dict(scaled)
    nan_scale["model.diffusion_model.blocks.1.ffn.0.scale_weight"] = torch.tensor(float("nan"))
    save_file(nan_scale, str(folder / "nan_scale.safetensors"))
    wrong_shape = load_file(str(bf16))
    wrong_shape["model.diffusion_model.blocks.1.self_attn.v.weight"] = torch.randn(256, 128).to(torch.bfloat16)
    save_file(wrong_shape, str(folder / "wrong_shape.safetensors"))
    nan_weight = load_file(str(bf16))
    nan_weight["model.diffusion_model.blocks.0.cross_attn.k.weight"][3, 5] = float("nan")
    save_file(nan_weight, str(folder / "nan_weight.safetensors"))
    return bf16.name


WAN_LATENT = {
    "class_type": "EmptyHunyuanLatentVideo",
    "inputs": {"width": 32, "height": 32, "length": 1, "batch_size": 1},
}
FLUX_LATENT = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
FLUX_INPUTS = {"latent": FLUX_LATENT, "pooled_width": 768}  # and Flux's pooled CLIP-L vector


def sampling_prompt(
    loader: dict,
    name: str,
    lora: str | None = None,
    shift: float | None = None,
    latent: dict = WAN_LATENT,
    pooled_width: int = 0,
) -> dict:
    def conditioning(seed: int) -> dict:
        inputs = {"width": 4096, "tokens": 8, "seed": seed, "pooled_width": pooled_width}
        return {"class_type": "FP8TestRandomConditioning", "inputs": inputs}

    prompt = {
        "1": loader,
        "2": conditioning(1),
        "3": conditioning(2),
        "4": latent,
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "seed": SEED,
                "steps": 4,
                "cfg": 2.0,
                "sampler_name": "euler",
                "scheduler": "simple",
                "denoise": 1.0,
            },
        },
        "6": {"class_type": "FP8TestSaveLatent", "inputs": {"samples": ["5", 0], "name": name}},
    }
    if lora is not None:
        prompt["7"] = {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": ["1", 0], "lora_name": lora, "strength_model": 1.0},
        }
        prompt["5"]["inputs"]["model"] = ["7", 0]
    if shift is not None:  # ModelSamplingSD3, as Wan and Flux workflows use it, after the loader (and LoRA)
        prompt["8"] = {
            "class_type": "ModelSamplingSD3",
            "inputs": {"model": prompt["5"]["inputs"]["model"], "shift": shift},
        }
        prompt["5"]["inputs"]["model"] = ["8", 0]
    return prompt


def stock_loader(name: str, weight_dtype: str = "default") -> dict:
    return {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": weight_dtype}}


def our_loader(name: str, **options) -> dict:
    return {"class_type": "LoadFP8DiT", "inputs": {"unet_name": name, **options}}


def sample(comfyui, loader: dict, name: str, lora: str | None = None, shift: float | None = None, **kwargs):
    entry = comfyui.run(sampling_prompt(loader, name, lora, shift, **kwargs))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:2000]
    return load_file(str(comfyui.output / f"{name}.safetensors"))["samples"]


def test_pack_registers_its_nodes_without_errors(comfyui):
    info = comfyui.get("/object_info")
    assert info["LoadFP8DiT"]["display_name"] == "Load FP8 DiT"
    assert info["QuantizeTextEncoderFP8"]["display_name"] == "Quantize Text Encoder (FP8)"
    assert list(info["LoadFP8DiT"]["input"]["required"]) == ["unet_name"]
    assert list(info["QuantizeTextEncoderFP8"]["input"]["required"]) == ["clip"]
    log = comfyui.log_text()
    assert "IMPORT FAILED" not in log, log[-4000:]
    assert "Cannot import" not in log, log[-4000:]


def test_load_fp8_dit_samples_close_to_bf16_and_beats_stock_fp8(comfyui, tiny_wan):
    reference = sample(comfyui, stock_loader(tiny_wan), "bf16")
    ours = sample(comfyui, our_loader(tiny_wan), "ours_dynamic")
    weight_only = sample(comfyui, our_loader(tiny_wan, activation_scheme="none"), "ours_weight_only")
    stock_fp8 = sample(comfyui, stock_loader(tiny_wan, "fp8_e4m3fn"), "stock_fp8")
    errors = {
        "ours": rel_err(ours, reference),
        "ours_weight_only": rel_err(weight_only, reference),
        "stock_fp8": rel_err(stock_fp8, reference),
    }
    print(errors)
    assert errors["ours"] < 0.1, errors
    assert errors["ours_weight_only"] < errors["stock_fp8"], errors
    assert errors["ours"] < errors["stock_fp8"], errors


def test_every_layer_skipped_reproduces_the_stock_model(comfyui, tiny_wan):
    """With no layer quantized, Load FP8 DiT is the stock model: the same compute dtype (ComfyUI's own choice per
    model and device), the same non-linear layers; what is left is float rounding."""
    reference = sample(comfyui, stock_loader(tiny_wan), "bf16_ref_skip")
    skipped = sample(comfyui, our_loader(tiny_wan, skip_layers="re:.*"), "ours_all_skipped")
    assert rel_err(skipped, reference) < 1e-3


def test_same_fp8_file_as_accurate_as_the_stock_loader(comfyui, tiny_wan):
    """On identical fp8 weights (our comfy-quant file) Load FP8 DiT matches the newest stock loader; quantizing the
    bf16 file itself (per-layer scales) does better than the stock loader on the converted file."""
    quant_file = tiny_wan.replace("_bf16", "_fp8_quant")
    reference = sample(comfyui, stock_loader(tiny_wan), "bf16_ref_same")
    errors = {
        "stock_on_file": rel_err(sample(comfyui, stock_loader(quant_file), "stock_same_file"), reference),
        "ours_on_file": rel_err(sample(comfyui, our_loader(quant_file), "ours_same_file"), reference),
        "ours_on_the_fly": rel_err(sample(comfyui, our_loader(tiny_wan), "ours_same_fly"), reference),
    }
    print(errors)
    assert errors["ours_on_file"] <= 1.02 * errors["stock_on_file"], errors
    assert errors["ours_on_the_fly"] <= errors["stock_on_file"], errors


@pytest.fixture(scope="module")
def tiny_flux(comfyui) -> str:
    folder = comfyui.models / "diffusion_models"
    bf16 = write_fixture("flux", folder / "tiny_flux_bf16.safetensors")
    convert_checkpoint(bf16, folder / "tiny_flux_fp8_scaled.safetensors", "comfy-scaled")
    return bf16.name


def test_load_fp8_dit_flux_samples_close_to_bf16_and_beats_stock_fp8(comfyui, tiny_flux):
    """The Flux text-to-image path (Flux's own layer names: double/single blocks, img/txt modulation, guidance,
    pooled vector), on the fly and from a file our writer made, against the stock loader in bf16 and
    fp8_e4m3fn. A 2+2-block model at 24 tokens amplifies rounding more than the Wan one (errors 0.05-0.1)."""
    scaled = tiny_flux.replace("_bf16", "_fp8_scaled")
    reference = sample(comfyui, stock_loader(tiny_flux), "flux_bf16", **FLUX_INPUTS)
    runs = {
        "ours": our_loader(tiny_flux),
        "ours_weight_only": our_loader(tiny_flux, activation_scheme="none"),
        "ours_scaled_file": our_loader(scaled),
        "stock_fp8": stock_loader(tiny_flux, "fp8_e4m3fn"),
    }
    errors = {
        key: rel_err(sample(comfyui, loader, f"flux_{key}", **FLUX_INPUTS), reference) for key, loader in runs.items()
    }
    print(errors)
    assert errors["ours"] < 0.1, errors
    assert errors["ours_scaled_file"] < 0.1, errors
    assert errors["ours"] < errors["stock_fp8"], errors
    assert errors["ours_weight_only"] < errors["stock_fp8"], errors


@pytest.mark.parametrize(
    "file", ["tiny_wan_fp8_scaled.safetensors", "tiny_wan_fp8_quant.safetensors", "tiny_wan_fp8_channel.safetensors"]
)
def test_converted_files_load_in_our_loader(comfyui, tiny_wan, file):
    reference = sample(comfyui, stock_loader(tiny_wan), "bf16_ref")
    assert rel_err(sample(comfyui, our_loader(file), f"ours_{file}"), reference) < 0.15


@pytest.mark.parametrize("file", ["tiny_wan_fp8_scaled.safetensors", "tiny_wan_fp8_quant.safetensors"])
def test_our_converted_files_load_in_stock_unet_loader(comfyui, tiny_wan, file):
    """comfy-scaled (scale_weight + scaled_fp8) and comfy-quant (.comfy_quant) files from our writer, through
    ComfyUI's own UNETLoader."""
    reference = sample(comfyui, stock_loader(tiny_wan), "bf16_ref2")
    converted = sample(comfyui, stock_loader(file), f"stock_on_{file}")
    assert rel_err(converted, reference) < 0.15


def test_lora_changes_fp8_model_like_bf16(comfyui, tiny_wan):
    generator = torch.Generator().manual_seed(3)
    lora = {}
    for block in range(2):
        for proj in ("q", "k", "v", "o"):
            key = f"diffusion_model.blocks.{block}.self_attn.{proj}"
            lora[f"{key}.lora_down.weight"] = torch.randn(4, 256, generator=generator) * 0.2
            lora[f"{key}.lora_up.weight"] = torch.randn(256, 4, generator=generator) * 0.2
    save_file(lora, str(comfyui.models / "loras" / "tiny_wan_lora.safetensors"))
    lora = "tiny_wan_lora.safetensors"
    base_bf16 = sample(comfyui, stock_loader(tiny_wan), "lora_base_bf16", shift=5.0)
    lora_bf16 = sample(comfyui, stock_loader(tiny_wan), "lora_bf16", lora=lora, shift=5.0)
    base_fp8 = sample(comfyui, our_loader(tiny_wan), "lora_base_fp8", shift=5.0)
    lora_fp8 = sample(comfyui, our_loader(tiny_wan), "lora_fp8", lora=lora, shift=5.0)
    assert rel_err(lora_bf16, base_bf16) > 0.05  # the LoRA matters
    assert rel_err(lora_fp8 - base_fp8, lora_bf16 - base_bf16) < 0.3
    assert rel_err(lora_fp8, lora_bf16) < 0.12


def test_example_workflows_use_only_known_nodes(comfyui):
    info = comfyui.get("/object_info")
    for path in sorted((REPO / "example_workflows").glob("*.json")):
        types = {node["type"] for node in json.loads(path.read_text())["nodes"]}
        assert types <= info.keys(), (path.name, types - info.keys())
    for path in sorted((REPO / "example_workflows" / "api").glob("*.json")):
        types = {node["class_type"] for node in json.loads(path.read_text()).values()}
        assert types <= info.keys(), (path.name, types - info.keys())


@pytest.mark.parametrize(
    ("file", "named"),
    [
        ("broken.safetensors", "broken.safetensors"),  # header is not JSON
        ("nan_scale.safetensors", "blocks.1.ffn.0.scale_weight"),  # NaN scale
        ("wrong_shape.safetensors", "blocks.1.self_attn.v"),  # a layer that does not fit the model
        ("nan_weight.safetensors", "blocks.0.cross_attn.k"),  # NaN in a bf16 weight to quantize
    ],
)
def test_bad_file_is_a_node_error_and_the_server_goes_on(comfyui, tiny_wan, file, named):
    entry = comfyui.run(sampling_prompt(our_loader(file), "never"))
    assert entry["status"]["status_str"] == "error"
    messages = json.dumps(entry["status"]["messages"])
    assert file in messages and named in messages, entry["status"]["messages"]
    assert sample(comfyui, our_loader(tiny_wan), f"after_{file}").isfinite().all()


def run_inprocess(check: str, *args: str) -> dict:
    script = Path(__file__).with_name("inprocess_checks.py")
    done = subprocess.run(
        [COMFYUI_PYTHON, str(script), check, *args],
        capture_output=True,
        text=True,
        cwd=COMFYUI_DIR,
        env=dict(os.environ),
        timeout=900,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


# fp8 keeps ~4 bits of each value. On these random encoders, bf16 weights alone give 0.004 / 0.009 / 0.005 and
# fp8 weights alone (no activation quantization) 0.07 / 0.13 / 0.07 (t5 / umt5 / clip_l); a wrong scale gives ~1.
# The quality recipe (default) measured 0.050 / 0.061 / 0.012, clip_g 0.012, Qwen2.5-VL 0.039, Gemma 2 0.020,
# HunyuanVideo's CLIP-L + Llama 0.029.
TEXT_ENCODER_ERROR_BOUNDS = {
    "t5": 0.15,
    "umt5": 0.25,
    "clip_l": 0.15,
    "clip_g": 0.15,
    "qwen_image": 0.15,
    "lumina2": 0.15,
    "hunyuan_video": 0.15,
}
# The bar: at most half the error of ComfyUI's own --fp8_e4m3fn-text-enc (a plain fp8 cast) on the tiny T5.
# Measured: t5 0.34, umt5 0.50, clip_l 0.22, clip_g 0.18, qwen_image 0.35, hunyuan_video 0.26 (Gemma 2's stock
# fp8 path fails in ComfyUI itself: its norms add 1 to an fp8 weight).
STOCK_FP8_RATIO_BOUNDS = {"t5": 0.5}


def skip_unless_dynamic(result: dict, wanted: bool) -> None:
    if wanted and not result["dynamic_vram"]:
        pytest.skip("ComfyUI's dynamic VRAM needs a CUDA GPU and comfy-aimdo")


@pytest.mark.parametrize(
    "family",
    [
        *("t5", "umt5", "clip_l", "t5 lora", "umt5 lora", "t5 fp8", "umt5 fp8", "clip_l fp8"),
        *("clip_g", "qwen_image", "lumina2", "hunyuan_video", "hunyuan_video lora"),
        *("t5 lora dynamic", "umt5 dynamic", "clip_l dynamic", "t5 fp8 dynamic", "hunyuan_video dynamic"),
    ],
)
def test_quantize_text_encoder_leaves_input_clip_alone(family):
    """``fp8``: an encoder ComfyUI holds as fp8 casts (fp8 weight dtype) is used at unit scale, in fp8. Where ComfyUI's
    own fp8 cast of the same weights runs, the default recipe must beat it (by 2x on the tiny T5)."""
    result = run_inprocess("text_encoder", *family.split())
    print(family, {key: value for key, value in result.items() if key != "summary"})
    skip_unless_dynamic(result, "dynamic" in family)
    assert not result["returned_input"], result
    assert result.get("lora_effect", 1.0) > 0.1, result  # the patches matter, so following them is tested
    assert result["fp8_layers"] > 0, result
    assert result["input_unchanged"] and result["input_classes_unchanged"], result
    assert result["input_encodes_as_before"], result
    bound = TEXT_ENCODER_ERROR_BOUNDS[family.split()[0]]
    assert result["rel_err"] < bound, result
    assert result.get("pooled_rel_err", 0.0) < bound, result
    if "fp8" not in family.split():  # fitted: the summary carries the sensitivity table
        assert "quality recipe" in result["summary"] and "most sensitive layers" in result["summary"], result
    if "stock_fp8_rel_err" in result:
        ratio = result["rel_err"] / result["stock_fp8_rel_err"]
        assert ratio < STOCK_FP8_RATIO_BOUNDS.get(family.split()[0], 1.0), result
    assert family.split()[0] == "lumina2" or "stock_fp8_failed" not in result, result


@pytest.mark.parametrize("family", ["t5", "hunyuan_video"])
def test_text_encoder_recipes_side_by_side(family):
    """speed (fp8 x fp8; activations rounded as the FP8 GPU rounds them, also on the CPU) and plain next to the
    quality default: all close to the input, the default the most accurate."""
    errors = {recipe: run_inprocess("text_encoder", family, recipe)["rel_err"] for recipe in ("speed", "plain")}
    errors["quality"] = run_inprocess("text_encoder", family)["rel_err"]
    print(family, errors)
    assert max(errors.values()) < TEXT_ENCODER_ERROR_BOUNDS[family], errors
    assert errors["quality"] <= min(errors.values()), errors


def test_text_encoder_comfyui_already_quantized_comes_back_unchanged():
    """A .comfy_quant text encoder, loaded by ComfyUI's own mixed-precision ops: not an error, nothing to do."""
    result = run_inprocess("text_encoder", "t5", "comfy_quant")
    assert result["returned_input"] and result["rel_err"] == 0.0, result
    assert "ComfyUI's own quantized ops kept as loaded (12 float8_e4m3fn); unchanged" in result["summary"], result


@pytest.mark.parametrize("family", ["t5", "umt5", "clip_l", "clip_g", "lumina2", "hunyuan_video"])
def test_quantize_text_encoder_through_clip_text_encode(comfyui, family):
    prompt = {
        "1": {"class_type": "FP8TestTinyTextEncoder", "inputs": {"family": family, "seed": 0, "storage": "bf16"}},
        "2": {"class_type": "QuantizeTextEncoderFP8", "inputs": {"clip": ["1", 0]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 0], "text": "a red fox in the snow"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a red fox in the snow"}},
        "5": {"class_type": "FP8TestSaveConditioning", "inputs": {"conditioning": ["3", 0], "name": f"te_{family}"}},
        "6": {
            "class_type": "FP8TestSaveConditioning",
            "inputs": {"conditioning": ["4", 0], "name": f"te_{family}_fp8"},
        },
    }
    entry = comfyui.run(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:2000]
    assert "linears quantized" in json.dumps(entry["outputs"]["2"]), entry["outputs"]
    reference = load_file(str(comfyui.output / f"te_{family}.safetensors"))
    quantized = load_file(str(comfyui.output / f"te_{family}_fp8.safetensors"))
    assert reference.keys() == quantized.keys()
    for key in reference:
        error = rel_err(quantized[key], reference[key])
        assert 0 < error < TEXT_ENCODER_ERROR_BOUNDS[family], (key, error)


@pytest.mark.parametrize("vram", ["classic", "dynamic"])
def test_sampling_in_process_close_to_bf16_and_beats_stock_fp8(tmp_path, vram):
    """The sampling comparison of the server test, in one process: on a GPU this runs the FP8 kernels, next to
    ComfyUI's own fp8 paths and, with ``dynamic``, under ComfyUI's default dynamic-VRAM model management."""
    model = write_fixture("wan", tmp_path / "tiny_wan.safetensors")
    result = run_inprocess("sampling", str(model), *(["dynamic"] if vram == "dynamic" else []))
    skip_unless_dynamic(result, vram == "dynamic")
    print(result)
    errors = result["errors"]
    assert errors["ours"] < 0.1, result
    assert errors["ours_weight_only"] < errors["stock_fp8"], result
    assert errors["ours"] < errors["stock_fp8"], result
    assert result["patchers"]["ours"] == "ModelPatcher", result  # the classic patcher drives the fp8 layers
    if result["device"].startswith("cuda"):
        assert "kernel scaled_mm" in result["summaries"]["auto"], result


def test_lowvram_partial_load_matches_full_load(tmp_path):
    model = write_fixture("wan", tmp_path / "tiny_wan.safetensors")
    result = run_inprocess("lowvram", str(model))
    assert result["full_fp8_layers"] > 0 and result["lowvram_cast_layers"] > 0, result
    if result["device"].startswith("cuda"):
        assert result["lowvram_offloaded_layers"] > 0 and result["full_offloaded_layers"] == 0, result
    assert result["patch_effect"] > 0.05, result
    assert result["rel_diff"] < 1e-3, result
    # lowvram multiplies the patched weight in bf16, a full load re-quantizes it to fp8: equal up to fp8 rounding.
    assert result["rel_diff_patched"] < 0.1, result
