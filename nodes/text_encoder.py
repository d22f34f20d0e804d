"""Quantize Text Encoder (FP8): a new CLIP whose encoder linears are fp8; the input CLIP is left as it was."""

from __future__ import annotations

import logging

from fp8_quant import clone_module_tree, prepare_model_for_fp8

from .loader import CATEGORY
from .ops import install_comfy_forward
from .options import (
    forced_kernel,
    online_config,
    text_encoder_optional_inputs,
)

logger = logging.getLogger(__name__)

# Attributes ComfyUI's ModelPatcher keeps on the model object itself; a fresh model starts unloaded.
_PATCHER_STATE = {
    "model_loaded_weight_memory": 0,
    "model_lowvram": False,
    "lowvram_patch_counter": 0,
    "current_weight_patches_uuid": None,
}


class QuantizeTextEncoderFP8:
    DESCRIPTION = (
        "Returns a copy of the CLIP whose text-encoder linears are FP8 (T5/UMT5, CLIP, Gemma, Qwen, ...). "
        "The input CLIP is not changed, so other nodes can keep using it."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "quantize"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"clip": ("CLIP",)},
            "optional": text_encoder_optional_inputs(),
        }

    def quantize(
        self,
        clip,
        activation_scheme: str = "dynamic",
        activation_granularity: str = "auto",
        weight_granularity: str = "channel",
        kernel: str = "auto",
        skip_layers: str = "",
    ):
        import comfy.model_management
        import comfy.utils

        config = online_config(activation_scheme, activation_granularity, weight_granularity, skip_layers)
        source_patcher = clip.patcher
        if getattr(source_patcher, "backup", None):
            # The input's weights are patched in place right now (loaded with a LoRA): put them back first so
            # that the copy is made of the real weights. ComfyUI re-patches the input when it next loads it.
            source_patcher.unpatch_model(source_patcher.offload_device)
        model = clone_module_tree(clip.cond_stage_model)
        for name, value in _PATCHER_STATE.items():
            if hasattr(model, name):
                setattr(model, name, value)
        device = comfy.model_management.get_torch_device()
        progress = comfy.utils.ProgressBar(1)
        report = prepare_model_for_fp8(
            model,
            config,
            kernel=forced_kernel(kernel),
            quantize_device=device if device.type == "cuda" else None,
            compute_device=device,
            progress=lambda done, total, name: progress.update_absolute(done, total),
            install=install_comfy_forward,
        )
        new_clip = clip.clone()  # a new CLIP with a new patcher (its own copy of the patches), same model
        new_clip.cond_stage_model = model
        new_clip.patcher.model = model
        new_clip.patcher.size = 0  # recomputed from the fp8 model on the next load
        summary = f"text encoder {type(model).__name__}: {report.summary()}"
        logger.info(summary)
        return {"ui": {"text": [summary]}, "result": (new_clip,)}
