"""Quantize Text Encoder (FP8): a new CLIP whose encoder linears are fp8; the input CLIP is left as it was."""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from fp8_quant import clone_module_tree, prepare_model_for_fp8
from fp8_quant.bridge import count_labels

from .comfy_cast import comfy_weight_caster
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
# Load state ComfyUI's patchers leave on the model and on each module (dynamic-VRAM allocations, pins, lowvram
# hooks): it belongs to the input's patcher, so the copy starts without it.
_PATCHER_MODEL_ATTRIBUTES = ("dynamic_vbars", "dynamic_pins", "dynamic_patchers")
_PATCHER_MODULE_ATTRIBUTES = (
    "_v",
    "_v_weight",
    "_v_bias",
    "_v_signature",
    "_pin_state",
    "_prefetch",
    "seed_key",
    "weight_lowvram_function",
    "bias_lowvram_function",
    "comfy_patched_weights",
    "prev_comfy_cast_weights",
    "fp8_scales_on_device",
)


def _forget_patcher_state(model) -> None:
    for name, value in _PATCHER_STATE.items():
        if hasattr(model, name):
            setattr(model, name, value)
    for name in _PATCHER_MODEL_ATTRIBUTES:
        model.__dict__.pop(name, None)
    for module in model.modules():
        for name in _PATCHER_MODULE_ATTRIBUTES:
            module.__dict__.pop(name, None)
        if "comfy_cast_weights" in module.__dict__:
            module.comfy_cast_weights = False
        for name in ("weight_function", "bias_function"):
            if name in module.__dict__:
                setattr(module, name, [])


_LINEAR_ATTRIBUTES = ("in_features", "out_features", "weight")


def _comfy_mixed_precision_layers(model) -> dict[str, str]:
    """Linear layers of ComfyUI's own mixed-precision ops (fp8/fp4 text-encoder files, ``.comfy_quant``): not
    ``nn.Linear``, their weights are ComfyUI's quantized tensors. Name -> format ("" for a layer left in high
    precision). They keep ComfyUI's forward."""
    return {
        name: getattr(module, "quant_format", None) or ""
        for name, module in model.named_modules()
        if not isinstance(module, nn.Linear) and all(hasattr(module, a) for a in _LINEAR_ATTRIBUTES)
    }


def _describe_mixed(layers: dict[str, str]) -> str:
    kinds = count_labels(layer_format or "high precision" for layer_format in layers.values())
    return f"{len(layers)} layers of ComfyUI's own quantized ops kept as loaded ({kinds})"


def _hand_to_model_management(patcher) -> None:
    """Where the input was loaded on the GPU, the fp8 weights were made there too: register the copy as loaded,
    as ComfyUI's own CLIP does for an encoder it creates on the GPU, so that its memory manager can offload it."""
    import comfy.model_management

    load_device = patcher.load_device
    if comfy.model_management.is_device_cpu(load_device):
        return
    if any(param.device == torch.device(load_device) for param in patcher.model.parameters()):
        comfy.model_management.load_models_gpu([patcher], force_full_load=True)


def _restore_backups(model, source_patcher) -> None:
    """Weights the input's patcher has patched (a LoRA loaded in place) go into the copy as they were before the
    patch, from the patcher's own backups; the input is not touched. The copy's patcher re-applies the patches."""
    import comfy.utils

    for key, entry in getattr(source_patcher, "backup", {}).items():
        comfy.utils.set_attr_param(model, key, entry.weight)
    for key, buffer in getattr(source_patcher, "backup_buffers", {}).items():
        comfy.utils.set_attr_buffer(model, key, buffer)


def _patcher_for(source_patcher, model):
    """A patcher of the source's kind of settings (patches, hooks, options) over ``model``, with its own backups.

    ``clone()`` alone would share the source's weight backups, so that unpatching one model could write the other
    one's weights. The copy gets the classic patcher: the dynamic-VRAM one stages weights through its own buffers,
    which the fp8 forward does not read.
    """
    fresh_backups = ({}, {}, {}, set())
    try:
        patcher = source_patcher.clone(disable_dynamic=True, model_override=(model, fresh_backups))
    except TypeError:  # an older ComfyUI: clone() takes no arguments
        patcher = source_patcher.clone()
        patcher.model = model
        patcher.backup, patcher.backup_buffers, patcher.object_patches_backup = {}, {}, {}
    # Not a clone of the input's patcher (another model): ComfyUI's model management would hand a loaded model
    # over to the parent when the clone goes, and the link would keep the input's model alive.
    patcher.parent = None
    return patcher


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
        mixed = _comfy_mixed_precision_layers(clip.cond_stage_model)
        if mixed and not any(isinstance(m, nn.Linear) for m in clip.cond_stage_model.modules()):
            # A text encoder ComfyUI already loaded quantized (an fp8 "scaled" or .comfy_quant file): nothing to
            # do, and not an error, since the graph still works; the input goes out as it came in.
            summary = f"text encoder {type(clip.cond_stage_model).__name__}: {_describe_mixed(mixed)}; unchanged"
            logger.info(summary)
            return {"ui": {"text": [summary]}, "result": (clip,)}
        source_patcher = clip.patcher
        model = clone_module_tree(clip.cond_stage_model)
        _restore_backups(model, source_patcher)
        _forget_patcher_state(model)
        device = comfy.model_management.get_torch_device()
        caster = comfy_weight_caster()
        progress = comfy.utils.ProgressBar(1)
        report = prepare_model_for_fp8(
            model,
            config,
            kernel=forced_kernel(kernel),
            quantize_device=device if device.type == "cuda" else None,
            compute_device=device,
            progress=lambda done, total, name: progress.update_absolute(done, total),
            install=lambda module: install_comfy_forward(module, caster),
        )
        # The CLIP's settings (tokenizer, layer, options) with a model and patcher of its own. Not clip.clone():
        # that makes a patcher over the input's model, and a dynamic one detaches from that model when dropped.
        new_clip = copy.copy(clip)
        if isinstance(getattr(clip, "tokenizer_options", None), dict):
            new_clip.tokenizer_options = dict(clip.tokenizer_options)
        new_clip.cond_stage_model = model
        new_clip.patcher = _patcher_for(source_patcher, model)
        new_clip.patcher.size = 0  # recomputed from the fp8 model on the next load
        _hand_to_model_management(new_clip.patcher)
        summary = f"text encoder {type(model).__name__}: {report.summary()}"
        if mixed:
            summary += f"; {_describe_mixed(mixed)}"
        logger.info(summary)
        return {"ui": {"text": [summary]}, "result": (new_clip,)}
