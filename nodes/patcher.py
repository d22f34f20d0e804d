"""Patcher surgery for a copied text encoder: a model of its own under a ComfyUI patcher of its own.

ComfyUI's patchers keep load state on the model and its modules (loaded bytes, lowvram hooks, dynamic-VRAM
allocations) and weight backups in the patcher; ``CLIP.clone()`` shares those backups. A quantized copy must start
with none of the input's state and with backups of its own, or unpatching one model could write the other's
weights.
"""

from __future__ import annotations

import torch
from torch import nn

from fp8_quant.report import count_labels

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
)
_LINEAR_ATTRIBUTES = ("in_features", "out_features", "weight")


def forget_patcher_state(model: nn.Module) -> None:
    """Drop the load state the input's patcher left on ``model`` (a copy sharing the input's attributes)."""
    for name, value in _PATCHER_STATE.items():
        if hasattr(model, name):
            setattr(model, name, value)
    for name in _PATCHER_MODEL_ATTRIBUTES:
        model.__dict__.pop(name, None)
    for module in model.modules():
        # The cast flag as the class made it (manual-cast ops cast their weights to the input's dtype); the input's
        # patcher may have set it for its own load (lowvram, dynamic VRAM). The copy's patcher sets its own.
        module.__dict__.pop("comfy_cast_weights", None)
        for name in _PATCHER_MODULE_ATTRIBUTES:
            module.__dict__.pop(name, None)
        for name in ("weight_function", "bias_function"):
            if name in module.__dict__:
                setattr(module, name, [])


def restore_backups(model: nn.Module, source_patcher) -> None:
    """Weights the input's patcher has patched (a LoRA loaded in place) go into the copy as they were before the
    patch, from the patcher's own backups; the input is not touched. The copy's patcher re-applies the patches."""
    import comfy.utils

    for key, entry in getattr(source_patcher, "backup", {}).items():
        comfy.utils.set_attr_param(model, key, entry.weight)
    for key, buffer in getattr(source_patcher, "backup_buffers", {}).items():
        comfy.utils.set_attr_buffer(model, key, buffer)


def patcher_for(source_patcher, model: nn.Module):
    """A patcher of the source's kind of settings (patches, hooks, options) over ``model``, with its own backups.

    ``clone()`` alone would share the source's weight backups. The copy gets the classic patcher: the dynamic-VRAM
    one stages weights through its own buffers, which the fp8 forward does not read.
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
    patcher.size = 0  # recomputed from the fp8 model on the next load
    return patcher


def hand_to_model_management(patcher) -> None:
    """Where the input was loaded on the GPU, the fp8 weights were made there too: register the copy as loaded,
    as ComfyUI's own CLIP does for an encoder it creates on the GPU, so that its memory manager can offload it."""
    import comfy.model_management

    load_device = patcher.load_device
    if comfy.model_management.is_device_cpu(load_device):
        return
    if any(param.device == torch.device(load_device) for param in patcher.model.parameters()):
        comfy.model_management.load_models_gpu([patcher], force_full_load=True)


def comfy_quantized_layers(model: nn.Module) -> dict[str, str]:
    """Linear layers of ComfyUI's own mixed-precision ops (fp8/fp4 text-encoder files, ``.comfy_quant``): not
    ``nn.Linear``, their weights are ComfyUI's quantized tensors. Name -> format ("" for a layer left in high
    precision). They keep ComfyUI's forward."""
    return {
        name: getattr(module, "quant_format", None) or ""
        for name, module in model.named_modules()
        if not isinstance(module, nn.Linear) and all(hasattr(module, a) for a in _LINEAR_ATTRIBUTES)
    }


def describe_comfy_quantized(layers: dict[str, str]) -> str:
    kinds = count_labels(layer_format or "high precision" for layer_format in layers.values())
    return f"{len(layers)} layers of ComfyUI's own quantized ops kept as loaded ({kinds})"
