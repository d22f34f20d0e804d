"""Test-only ComfyUI nodes, linked into the test server's custom_nodes (and imported by inprocess_checks.py).

- ``FP8TestRandomConditioning``: random text conditioning of a given width, so DiT tests need no text encoder.
- ``FP8TestTinyTextEncoder``: a tiny random text encoder of ComfyUI's own classes, made small through the
  ``<name>_model_config`` model options ComfyUI offers for that: T5 and CLIP-L through ComfyUI's text-encoder loader
  (``comfy.sd.load_text_encoder_state_dicts``: detection from the keys, its ``CLIP`` and patcher); UMT5 (Wan),
  CLIP-L + CLIP-G (SDXL), Qwen2.5-VL (Qwen-Image), Gemma 2 (Lumina 2) and CLIP-L + Llama (HunyuanVideo) built as
  ``CLIP`` objects from the model's own tokenizer and text-encoder classes (ComfyUI detects those files by sizes a
  tiny model does not have).
- ``FP8TestSaveLatent`` / ``FP8TestSaveConditioning``: write results to the output folder for the test to read.
- ``FP8TestLinearBytes``: the bytes a MODEL's block linears hold (weights and scales) next to their bf16 size.
"""

from __future__ import annotations

import inspect
import os

import torch

TINY_TEXT_ENCODERS = {
    # family: (ComfyUI clip type name, model-config option name, config overrides)
    "t5": (
        "STABLE_AUDIO",
        "t5base_model_config",
        {"d_model": 64, "d_kv": 16, "num_heads": 4, "d_ff": 128, "num_layers": 2},
    ),
    # Wan's UMT5-XXL class at a tiny width. ComfyUI detects UMT5 files by their 24th block, so this one is built
    # directly (ComfyUI's CLIP, Wan tokenizer with a tiny SentencePiece model, Wan's text-encoder class).
    "umt5": (
        None,
        "umt5xxl_model_config",
        {"d_model": 64, "d_kv": 16, "num_heads": 4, "d_ff": 128, "num_layers": 2, "vocab_size": 64},
    ),
    "clip_l": (
        "STABLE_DIFFUSION",
        "clip_l_model_config",
        {
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_attention_heads": 4,
            "num_hidden_layers": 3,
            "projection_dim": 64,
        },
    ),
}


TINY_CLIP_L = TINY_TEXT_ENCODERS["clip_l"][2]
# Built directly (clip type None): option name -> config. LLM configs keep the classes' head_dim (not a config field).
DIRECT_TEXT_ENCODERS = {
    "clip_g": {
        "clip_l_model_config": TINY_CLIP_L,
        "clip_g_model_config": {**TINY_CLIP_L, "hidden_size": 80, "num_attention_heads": 5, "projection_dim": 80},
    },
    "qwen_image": {
        "qwen25_7b_model_config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
        }
    },
    "lumina2": {
        "gemma2_2b_model_config": {
            "vocab_size": 128,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 3,  # Lumina 2 takes the second-to-last layer
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
        }
    },
    "hunyuan_video": {
        "clip_l_model_config": TINY_CLIP_L,
        "llama_model_config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,  # HunyuanVideo takes the third-to-last layer
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
        },
    },
}
for _family in DIRECT_TEXT_ENCODERS:
    TINY_TEXT_ENCODERS[_family] = (None, "", {})


def clip_target(family: str):
    """(ComfyUI's ``ClipTarget`` of the model family, tokenizer data) for the families built directly."""
    from comfy.supported_models_base import ClipTarget

    if family == "umt5":
        import comfy.text_encoders.wan

        return ClipTarget(comfy.text_encoders.wan.WanT5Tokenizer, comfy.text_encoders.wan.te()), {
            "spiece_model": tiny_spiece_model()
        }
    if family == "clip_g":
        import comfy.sdxl_clip

        return ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel), {}
    if family == "qwen_image":
        import comfy.text_encoders.qwen_image

        return ClipTarget(comfy.text_encoders.qwen_image.QwenImageTokenizer, comfy.text_encoders.qwen_image.te()), {}
    if family == "lumina2":
        import comfy.text_encoders.lumina2

        target = ClipTarget(comfy.text_encoders.lumina2.LuminaTokenizer, comfy.text_encoders.lumina2.te())
        return target, {"spiece_model": tiny_spiece_model(bos_id=2, unk_id=3)}
    if family == "hunyuan_video":
        import comfy.text_encoders.hunyuan_video as hunyuan

        return ClipTarget(hunyuan.HunyuanVideoTokenizer, hunyuan.hunyuan_video_clip()), {}
    raise ValueError(f"unknown text encoder family {family!r}")


def tiny_text_encoder_state_dict(family: str, seed: int) -> dict[str, torch.Tensor]:
    """Random weights in the layout of the family's files (the keys and shapes of ComfyUI's own model)."""
    import comfy.sd
    import comfy.text_encoders.sa_t5
    from comfy.sd1_clip import SD1ClipModel

    _, option, config = TINY_TEXT_ENCODERS[family]
    import comfy.text_encoders.wan

    if family in DIRECT_TEXT_ENCODERS:  # the whole text-encoder model's keys, shapes read from a model on "meta"
        target, _ = clip_target(family)
        options = DIRECT_TEXT_ENCODERS[family]
        return _random_state(_template(lambda: target.clip(device="meta", model_options=options)), seed)
    builders = {
        "t5": lambda: comfy.text_encoders.sa_t5.SAT5Model(model_options={option: config}),
        "umt5": lambda: comfy.text_encoders.wan.WanT5Model(model_options={option: config}),
        "clip_l": lambda: SD1ClipModel(model_options={option: config}),
    }
    model = _template(builders[family])
    return _random_state(getattr(model, model.clip).transformer, seed)


def _template(build):
    """A model built to read its keys and shapes. With ComfyUI's dynamic VRAM on, its layers leave their weights
    unset until a state dict brings them: the template is built the classic way."""
    try:
        import comfy.memory_management as memory_management
    except ImportError:  # an older ComfyUI: no dynamic VRAM
        memory_management = None
    dynamic = getattr(memory_management, "aimdo_enabled", False)
    if memory_management is not None:
        memory_management.aimdo_enabled = False
    try:
        return build()
    finally:
        if memory_management is not None:
            memory_management.aimdo_enabled = dynamic


def _random_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if "position_ids" in key or not value.is_floating_point():
            tensor = value.clone()
        elif "norm" in key and key.endswith("weight"):
            # A few loud channels in the norm gains give the activation outlier channels real encoders have.
            tensor = torch.ones(value.shape)
            tensor[:: max(1, value.shape[0] // 8)] = 5.0
        elif key.endswith("bias") or value.dim() < 2:
            tensor = torch.randn(value.shape, generator=generator) * 0.02
        else:
            # Small enough that the random encoder is not chaotic (T5 does not scale its attention logits).
            gain = 0.3 if any(part in key for part in (".q.", ".k.", "q_proj", "k_proj", "relative_attention")) else 0.7
            tensor = torch.randn(value.shape, generator=generator) * gain / max(1, value.shape[-1]) ** 0.5
        state[key] = tensor
    return state


STORAGES = ["bf16", "fp8", "comfy_quant"]


def comfy_quant_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's own mixed-precision layout: fp8 weight, per-tensor ``weight_scale``, ``.comfy_quant`` JSON."""
    import json

    marker = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
    out = {}
    for key, value in state.items():
        layer = key[: -len(".weight")]
        if key.endswith(".weight") and value.dim() == 2 and not any(p in key for p in ("embed", "shared", "relative")):
            scale = value.float().abs().max() / 448.0
            out[key] = (value.float() / scale).to(torch.float8_e4m3fn)
            out[layer + ".weight_scale"] = scale.reshape(())
            out[layer + ".comfy_quant"] = marker
        else:
            out[key] = value
    return out


def tiny_text_encoder(family: str, seed: int = 0, storage: str = "bf16"):
    """``storage``: bf16 weights; ``fp8``, held as plain fp8 casts (ComfyUI's fp8 weight dtype); ``comfy_quant``,
    loaded by ComfyUI's own mixed-precision ops from a ``.comfy_quant`` file."""
    import comfy.sd

    clip_type_name, option, config = TINY_TEXT_ENCODERS[family]
    state = tiny_text_encoder_state_dict(family, seed)
    # CLIP-L files go through ComfyUI's long-CLIP check, which rebuilds the clip_l option from "model_config".
    model_options = {option: config, "model_config": dict(config)} if option else {}
    model_options.update(DIRECT_TEXT_ENCODERS.get(family, {}))
    if storage == "fp8":
        model_options["dtype"] = torch.float8_e4m3fn
    elif storage == "comfy_quant":
        state = comfy_quant_state_dict(state)
        model_options["quantization_metadata"] = {"mixed_ops": True}
    if family in DIRECT_TEXT_ENCODERS:
        import comfy.sd

        target, tokenizer_data = clip_target(family)
        if storage == "comfy_quant":
            raise ValueError(f"{family}: comfy_quant storage is only made for T5")
        clip = comfy.sd.CLIP(target, tokenizer_data=tokenizer_data, model_options=model_options)
        missing, unexpected = clip.cond_stage_model.load_state_dict(state, strict=False)
        if [key for key in missing if "position_ids" not in key] or unexpected:
            raise ValueError(f"{family}: state dict does not fit ({missing[:3]}, {unexpected[:3]})")
        return clip
    if clip_type_name is None:
        target, tokenizer_data = clip_target(family)
        if "state_dict" in inspect.signature(comfy.sd.CLIP.__init__).parameters:
            return comfy.sd.CLIP(target, tokenizer_data=tokenizer_data, state_dict=[state], model_options=model_options)
        clip = comfy.sd.CLIP(target, tokenizer_data=tokenizer_data, model_options=model_options)  # older ComfyUI
        clip.load_sd(state)
        return clip
    return comfy.sd.load_text_encoder_state_dicts(
        [state], clip_type=getattr(comfy.sd.CLIPType, clip_type_name), model_options=model_options
    )


def tiny_spiece_model(bos_id: int = -1, unk_id: int = 2) -> bytes:
    """A SentencePiece model trained here on a few sentences, with T5's special ids (pad 0, eos 1) or, given
    ``bos_id``, Gemma's (pad 0, eos 1, bos 2)."""
    import io

    import sentencepiece

    corpus = [
        "a red fox jumps over the lazy dog",
        "cinematic shot of a cat in the snow",
        "a woman walks on the beach at sunset",
    ] * 20
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=64,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=unk_id,
        bos_id=bos_id,
        minloglevel=2,
    )
    return model.getvalue()


class FP8TestRandomConditioning:
    CATEGORY = "testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "width": ("INT", {"default": 4096, "min": 16, "max": 8192}),
                "tokens": ("INT", {"default": 8, "min": 1, "max": 512}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
            },
            # Width of a pooled text vector (Flux's CLIP-L 768); 0 for none.
            # An all-ones text attention mask, as LTX's text encoders give with their tokens (LTX needs one).
            "optional": {
                "pooled_width": ("INT", {"default": 0, "min": 0, "max": 8192}),
                "attention_mask": ("BOOLEAN", {"default": False}),
            },
        }

    def make(self, width, tokens, seed, pooled_width=0, attention_mask=False):
        generator = torch.Generator().manual_seed(seed)
        extra = {"pooled_output": torch.randn(1, pooled_width, generator=generator)} if pooled_width else {}
        if attention_mask:
            extra["attention_mask"] = torch.ones(1, tokens, dtype=torch.long)  # integer, as tokenizers give it
        return ([[torch.randn(1, tokens, width, generator=generator), extra]],)


class FP8TestTinyTextEncoder:
    CATEGORY = "testing"
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "family": (list(TINY_TEXT_ENCODERS),),
                "seed": ("INT", {"default": 0}),
                "storage": (STORAGES, {"default": "bf16"}),
            }
        }

    def load(self, family, seed, storage):
        return (tiny_text_encoder(family, seed, storage),)


def _save(name: str, tensors: dict[str, torch.Tensor]) -> dict:
    import folder_paths
    from safetensors.torch import save_file

    path = os.path.join(folder_paths.get_output_directory(), name + ".safetensors")
    save_file({key: value.float().contiguous() for key, value in tensors.items()}, path)
    return {"ui": {"path": [path]}}


class _FP8TestSaveNode:
    """An output node that writes one input to ``output/<name>.safetensors``; subclasses say which input."""

    CATEGORY = "testing"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    INPUT_NAME = ""
    INPUT_TYPE = ""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {cls.INPUT_NAME: (cls.INPUT_TYPE,), "name": ("STRING", {"default": cls.INPUT_NAME})}}

    def save(self, name, **inputs):
        return _save(name, self.tensors(inputs[self.INPUT_NAME]))


class FP8TestSaveLatent(_FP8TestSaveNode):
    INPUT_NAME, INPUT_TYPE = "samples", "LATENT"

    @staticmethod
    def tensors(samples) -> dict[str, torch.Tensor]:
        return {"samples": samples["samples"]}


class FP8TestSaveConditioning(_FP8TestSaveNode):
    INPUT_NAME, INPUT_TYPE = "conditioning", "CONDITIONING"

    @staticmethod
    def tensors(conditioning) -> dict[str, torch.Tensor]:
        tensors = {"cond": conditioning[0][0]}
        pooled = conditioning[0][1].get("pooled_output")
        if pooled is not None:
            tensors["pooled"] = pooled
        return tensors


class FP8TestLinearBytes:
    """Writes ``output/<name>.json``: ``{"held": bytes, "bf16": bytes, "layers": n}`` over the linears whose names
    start with ``prefix`` (the transformer blocks): each weight as the model holds it, plus its scales."""

    CATEGORY = "testing"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "measure"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "name": ("STRING", {"default": "bytes"}), "prefix": ("STRING",)}}

    def measure(self, model, name, prefix):
        import json

        import folder_paths

        held = bf16 = layers = 0
        for layer_name, module in model.model.diffusion_model.named_modules():
            weight = getattr(module, "weight", None)
            if not layer_name.startswith(prefix) or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                continue
            layers += 1
            bf16 += weight.numel() * 2
            for tensor in (weight, getattr(module, "weight_scale", None), getattr(module, "input_scale", None)):
                if isinstance(tensor, torch.Tensor):
                    held += tensor.numel() * tensor.element_size()
        path = os.path.join(folder_paths.get_output_directory(), name + ".json")
        with open(path, "w") as handle:
            json.dump({"held": held, "bf16": bf16, "layers": layers}, handle)
        return {"ui": {"path": [path]}}


NODE_CLASS_MAPPINGS = {
    "FP8TestLinearBytes": FP8TestLinearBytes,
    "FP8TestRandomConditioning": FP8TestRandomConditioning,
    "FP8TestTinyTextEncoder": FP8TestTinyTextEncoder,
    "FP8TestSaveLatent": FP8TestSaveLatent,
    "FP8TestSaveConditioning": FP8TestSaveConditioning,
}
