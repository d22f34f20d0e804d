"""ComfyUI's own diffusion-model loader, run with this pack's fp8 ``Linear`` (``comfy_ops``)."""

from __future__ import annotations

import inspect

import torch

from .comfy_ops import LoadPlan, make_fp8_operations
from .dtype_policy import base_operations, cast_every_call, comfy_dtypes, store_in_built_dtypes


def load_fp8_diffusion_model(
    state_dict: dict[str, torch.Tensor], plan: LoadPlan, device: torch.device, metadata: dict[str, str] | None = None
):
    """ComfyUI's own diffusion-model loader with this pack's fp8 ``Linear``; returns ComfyUI's ``ModelPatcher``.

    ``metadata`` is the file's safetensors metadata, handed to ComfyUI as its stock loader does: its model
    detection reads the architecture from ``metadata["config"]["transformer"]`` where the weights cannot tell it
    (Wan's ``text_dim`` and head count, LTX and LTX-2 settings).

    The other modules are ComfyUI's plain operations (``disable_weight_init``) where the model computes in the dtype
    it is built in, as the stock loader picks them (``comfy.ops.pick_operations``): they run torch's own forward.
    ComfyUI's weight-casting operations (``manual_cast``) send every norm, embedding and kept linear through its
    cast at every call, which costs more host time than an fp8 linear saves wherever the GPU waits for the host (a
    512 px Flux image's step took twice as long, bench/NOTES.md); they are kept where ComfyUI runs the model in
    another dtype than it stores it in (a bf16-only model on a GPU without bf16). ComfyUI's patcher still switches
    casting on for the modules it leaves on the host (lowvram) or patches per call (LoRA there).
    """
    import comfy.sd

    metadata = metadata or None  # as ComfyUI's own file reader gives it: None for a file without metadata
    compute_dtype, supported = comfy_dtypes(state_dict, metadata)
    operations = make_fp8_operations(base_operations(compute_dtype, device, supported), plan)
    load_options = {"model_options": {"custom_operations": operations, "dtype": compute_dtype}}
    accepted = inspect.signature(comfy.sd.load_diffusion_model_state_dict).parameters
    if "metadata" in accepted:  # every ComfyUI that reads a model's config from its file's metadata
        load_options["metadata"] = metadata
    if "disable_dynamic" in accepted:
        # ComfyUI's dynamic-VRAM patcher stages weights through buffers of its own that the fp8 forward does
        # not read; the classic patcher (full, partial and lowvram loading) drives these layers.
        load_options["disable_dynamic"] = True
    patcher = comfy.sd.load_diffusion_model_state_dict(state_dict, **load_options)
    if patcher is not None:
        store_in_built_dtypes(patcher.model.diffusion_model)
        if getattr(patcher.model, "manual_cast_dtype", None) not in (None, compute_dtype):
            cast_every_call(patcher.model.diffusion_model)  # ComfyUI decided otherwise than its rule above said
    return patcher
