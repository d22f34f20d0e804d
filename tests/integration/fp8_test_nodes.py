"""Test-only ComfyUI nodes, linked into the test server's custom_nodes (and imported by inprocess_checks.py).

- ``FP8TestRandomConditioning``: random text conditioning of a given width, so DiT tests need no text encoder.
- ``FP8TestTinyTextEncoder``: a tiny random T5 or CLIP-L text encoder loaded through ComfyUI's own text-encoder
  loader (``comfy.sd.load_text_encoder_state_dicts``: detection from the keys, ComfyUI's model classes, its
  ``CLIP`` and patcher), made small through the ``<name>_model_config`` model option ComfyUI offers for that.
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


def tiny_text_encoder_state_dict(family: str, seed: int) -> dict[str, torch.Tensor]:
    """Random weights in the layout of the family's files (the keys and shapes of ComfyUI's own model)."""
    import comfy.sd
    import comfy.text_encoders.sa_t5
    from comfy.sd1_clip import SD1ClipModel

    _, option, config = TINY_TEXT_ENCODERS[family]
    import comfy.text_encoders.wan

    builders = {
        "t5": lambda: comfy.text_encoders.sa_t5.SAT5Model(model_options={option: config}),
        "umt5": lambda: comfy.text_encoders.wan.WanT5Model(model_options={option: config}),
        "clip_l": lambda: SD1ClipModel(model_options={option: config}),
    }
    try:
        import comfy.memory_management as memory_management
    except ImportError:  # an older ComfyUI: no dynamic VRAM
        memory_management = None
    # With ComfyUI's dynamic VRAM on, its layers leave their weights unset until a state dict brings them: build
    # the template the classic way to read the keys and shapes.
    dynamic = getattr(memory_management, "aimdo_enabled", False)
    if memory_management is not None:
        memory_management.aimdo_enabled = False
    try:
        model = builders[family]()
    finally:
        if memory_management is not None:
            memory_management.aimdo_enabled = dynamic
    transformer = getattr(model, model.clip).transformer
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in transformer.state_dict().items():
        if "position_ids" in key:
            tensor = value.clone()
        elif "norm" in key and key.endswith("weight"):
            # A few loud channels in the norm gains give the activation outlier channels real encoders have.
            tensor = torch.ones(value.shape)
            tensor[:: max(1, value.shape[0] // 8)] = 5.0
        elif key.endswith("bias"):
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
    model_options = {option: config, "model_config": dict(config)}
    if storage == "fp8":
        model_options["dtype"] = torch.float8_e4m3fn
    elif storage == "comfy_quant":
        state = comfy_quant_state_dict(state)
        model_options["quantization_metadata"] = {"mixed_ops": True}
    if clip_type_name is None:
        import comfy.text_encoders.wan
        from comfy.supported_models_base import ClipTarget

        target = ClipTarget(comfy.text_encoders.wan.WanT5Tokenizer, comfy.text_encoders.wan.te())
        tokenizer_data = {"spiece_model": tiny_spiece_model()}
        if "state_dict" in inspect.signature(comfy.sd.CLIP.__init__).parameters:
            return comfy.sd.CLIP(target, tokenizer_data=tokenizer_data, state_dict=[state], model_options=model_options)
        clip = comfy.sd.CLIP(target, tokenizer_data=tokenizer_data, model_options=model_options)  # older ComfyUI
        clip.load_sd(state)
        return clip
    return comfy.sd.load_text_encoder_state_dicts(
        [state], clip_type=getattr(comfy.sd.CLIPType, clip_type_name), model_options=model_options
    )


def tiny_spiece_model() -> bytes:
    """A SentencePiece model trained here on a few sentences, with T5's special ids (pad 0, eos 1)."""
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
        unk_id=2,
        bos_id=-1,
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
            "optional": {"pooled_width": ("INT", {"default": 0, "min": 0, "max": 8192})},
        }

    def make(self, width, tokens, seed, pooled_width=0):
        generator = torch.Generator().manual_seed(seed)
        extra = {"pooled_output": torch.randn(1, pooled_width, generator=generator)} if pooled_width else {}
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
