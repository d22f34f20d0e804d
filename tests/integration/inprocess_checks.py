"""In-process checks against ComfyUI's own classes; run by test_comfyui_inprocess.py under COMFYUI_PYTHON.

Usage: python inprocess_checks.py CHECK   (prints one JSON object)
ComfyUI's ``nodes`` module and this pack's ``nodes`` package share a name, so the pack is imported under a
package name of its own, as ComfyUI itself imports custom nodes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, os.environ["COMFYUI_DIR"])

import torch  # noqa: E402


def import_pack():
    spec = importlib.util.spec_from_file_location(
        "comfyui_fp8_quant", REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_fp8_quant"] = module
    spec.loader.exec_module(module)
    return module


def rel_err(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return ((actual.double() - reference.double()).norm() / reference.double().norm()).item()


def tiny_t5_clip():
    import comfy.sd
    import comfy.sd1_clip
    import comfy.text_encoders.t5
    from transformers import T5TokenizerFast

    config = {
        "d_ff": 128,
        "d_kv": 16,
        "d_model": 64,
        "dense_act_fn": "gelu_pytorch_tanh",
        "is_gated_act": True,
        "layer_norm_epsilon": 1e-6,
        "model_type": "t5",
        "num_heads": 4,
        "num_layers": 2,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "vocab_size": 32128,
    }

    class TinyT5Model(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, model_options={}):  # noqa: B006
            super().__init__(
                device=device,
                layer=layer,
                layer_idx=layer_idx,
                textmodel_json_config=config,
                dtype=dtype,
                special_tokens={"end": 1, "pad": 0},
                model_class=comfy.text_encoders.t5.T5,
                enable_attention_masks=False,
                zero_out_masked=False,
                model_options=model_options,
            )

    tokenizer_path = Path(comfy.text_encoders.t5.__file__).with_name("t5_tokenizer")

    class TinyT5Tokenizer(comfy.sd1_clip.SDTokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):  # noqa: B006
            super().__init__(
                str(tokenizer_path),
                pad_with_end=False,
                embedding_size=64,
                embedding_key="t5tiny",
                tokenizer_class=T5TokenizerFast,
                has_start_token=False,
                pad_to_max_length=False,
                max_length=99999999,
                min_length=8,
                tokenizer_data=tokenizer_data,
            )

    class Target:
        @staticmethod
        def clip(device="cpu", dtype=None, model_options={}):  # noqa: B006
            return comfy.sd1_clip.SD1ClipModel(
                device=device, dtype=dtype, model_options=model_options, clip_name="t5tiny", clip_model=TinyT5Model
            )

        @staticmethod
        def tokenizer(embedding_directory=None, tokenizer_data={}):  # noqa: B006
            return comfy.sd1_clip.SD1Tokenizer(
                embedding_directory=embedding_directory,
                tokenizer_data=tokenizer_data,
                clip_name="t5tiny",
                tokenizer=TinyT5Tokenizer,
            )

    clip = comfy.sd.CLIP(target=Target, embedding_directory=None, tokenizer_data={}, parameters=0)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in clip.cond_stage_model.named_parameters():
            param.copy_(torch.ones_like(param) if "layer_norm" in name else torch.randn_like(param) * 0.1)
    return clip


def check_text_encoder() -> dict:
    pack = import_pack()
    clip = tiny_t5_clip()
    tokens = clip.tokenize("a red fox jumps over the lazy dog, cinematic")
    before_state = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
    reference = clip.encode_from_tokens(tokens)
    node = pack.NODE_CLASS_MAPPINGS["QuantizeTextEncoderFP8"]()
    output = node.quantize(clip)
    new_clip = output["result"][0]
    quantized = new_clip.encode_from_tokens(tokens)
    again = clip.encode_from_tokens(tokens)
    unchanged = all(
        torch.equal(value.view(torch.uint8) if value.dtype.itemsize == 1 else value, before_state[key])
        for key, value in clip.cond_stage_model.state_dict().items()
    )
    fp8_layers = sum(1 for m in new_clip.cond_stage_model.modules() if getattr(m, "fp8_method", None) is not None)
    return {
        "rel_err": rel_err(quantized, reference),
        "input_unchanged": unchanged,
        "input_encodes_as_before": bool(torch.equal(again, reference)),
        "fp8_layers": fp8_layers,
        "summary": output["ui"]["text"][0],
    }


def check_lowvram(model_path: str) -> dict:
    """A partial (lowvram) load gives the same output as a full load, through ComfyUI's ModelPatcher."""
    import comfy.model_management
    import comfy.ops
    import comfy.sd

    pack = import_pack()
    ops = sys.modules["comfyui_fp8_quant.nodes.ops"]
    options = sys.modules["comfyui_fp8_quant.nodes.options"]
    from fp8_quant.formats import load_checkpoint

    def build():
        checkpoint = load_checkpoint(model_path)
        config = options.online_config()
        plan = ops.LoadPlan(None, config, skip_patterns=config.ignored_layers)
        operations = ops.make_fp8_operations(comfy.ops.manual_cast, plan)
        return comfy.sd.load_diffusion_model_state_dict(
            checkpoint.state_dict, model_options={"custom_operations": operations}
        )

    torch.manual_seed(1)
    x = torch.randn(1, 16, 1, 8, 8)
    timestep = torch.tensor([0.5])
    context = torch.randn(1, 8, 4096)
    device = comfy.model_management.get_torch_device()
    results = {}
    for mode in ("full", "lowvram"):
        patcher = build()
        if mode == "full":
            patcher.load(device, lowvram_model_memory=0, force_patch_weights=True, full_load=True)
        else:
            patcher.load(device, lowvram_model_memory=1024, force_patch_weights=False, full_load=False)
        model = patcher.model
        with torch.no_grad():
            out = model.apply_model(x.to(device), timestep.to(device), c_crossattn=context.to(device))
        results[mode] = out.float().cpu()
        results[mode + "_lowvram_layers"] = sum(
            1 for m in model.modules() if getattr(m, "comfy_cast_weights", False) and hasattr(m, "fp8_method")
        )
        patcher.detach()
    _ = pack
    return {
        "rel_diff": rel_err(results["lowvram"], results["full"]),
        "lowvram_layers": results["lowvram_lowvram_layers"],
    }


if __name__ == "__main__":
    check = sys.argv[1]
    argument = sys.argv[2] if len(sys.argv) > 2 else None
    if check == "text_encoder":
        result = check_text_encoder()
    elif check == "lowvram":
        result = check_lowvram(argument)
    else:
        raise SystemExit(f"unknown check {check!r}")
    print("RESULT " + json.dumps(result))
