"""ComfyUI's dtype policy for a DiT this pack loads: the dtype it is built and computes in, which operations class
the other modules get, and weights stored in the dtypes ComfyUI built each module for. ``comfy`` is imported only
inside the functions (the module is imported without ComfyUI by the unit tests)."""

from __future__ import annotations

import inspect

import torch

from fp8_quant.fp8_utils import is_fp8_dtype
from fp8_quant.layer_state import is_fp8_layer


def base_operations(compute_dtype: torch.dtype, device: torch.device, supported: list[torch.dtype]) -> type:
    """ComfyUI's operations class for the modules that are not fp8 linears: its plain operations
    (``disable_weight_init``) where the model computes in the dtype it is built in, as the stock loader picks them
    (``comfy.ops.pick_operations``), else its weight-casting ones (``manual_cast``); see
    ``dit_model.load_fp8_diffusion_model`` for why."""
    import comfy.model_management
    import comfy.ops

    cast_to = comfy.model_management.unet_manual_cast(compute_dtype, device, supported)
    return comfy.ops.disable_weight_init if cast_to is None else comfy.ops.manual_cast


def comfy_dtypes(
    state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> tuple[torch.dtype, list[torch.dtype]]:
    """The dtype ComfyUI's stock loader builds this model in (fp16 for Wan on a recent GPU, bf16 for Flux, fp32 on
    the CPU), chosen by ComfyUI's own rule from the model's supported dtypes, as it does for its quantized files;
    and those supported dtypes.

    Given explicitly: left to ComfyUI, an fp8 state dict would make it build the non-linear modules (norms,
    embeddings, convs) in fp8 too and round their weights; and a fixed bf16 would make every layer kept in high
    precision (attention, norms, residuals) less precise than in the stock model.
    """
    import comfy.model_detection
    import comfy.model_management
    import comfy.utils

    prefix = comfy.model_detection.unet_prefix_from_state_dict(state_dict)
    # (ComfyUI's prefix replace pops the keys it moves: it gets a copy of the dict, the tensors are shared)
    unprefixed = comfy.utils.state_dict_prefix_replace(dict(state_dict), {prefix: ""}, filter_keys=True) or state_dict
    detect = comfy.model_detection.model_config_from_unet
    with_metadata = {"metadata": metadata} if "metadata" in inspect.signature(detect).parameters else {}
    config = detect(unprefixed, "", **with_metadata)
    supported = list(getattr(config, "supported_inference_dtypes", None) or [torch.float16, torch.bfloat16])
    file_dtype = comfy.utils.weight_dtype(unprefixed)  # as the stock loader: None for a quantized file
    quantized = file_dtype is not None and (is_fp8_dtype(file_dtype) or not file_dtype.is_floating_point)
    file_dtype = None if quantized else file_dtype  # fp8 or int8: ComfyUI's own choice for a quantized file
    parameters = comfy.utils.calculate_parameters(unprefixed)
    dtype = comfy.model_management.unet_dtype(
        model_params=parameters, supported_dtypes=supported, weight_dtype=file_dtype
    )
    return (dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16), supported


def cast_every_call(model: torch.nn.Module) -> None:
    """ComfyUI's weight cast at every call for each of its modules in ``model`` (not the fp8 layers): for a model
    that ComfyUI feeds activations of another dtype than its weights'."""
    for module in model.modules():
        if hasattr(module, "comfy_cast_weights") and not is_fp8_layer(module):
            module.comfy_cast_weights = True


def store_in_built_dtypes(model: torch.nn.Module) -> None:
    """Weights in the dtype ComfyUI built each module for (it records it as ``<name>_comfy_model_dtype``).

    Where ComfyUI's dynamic VRAM is enabled, its linears and embeddings take a file's tensors as they are (its own
    patcher casts them later); this pack's classic patcher does not, and plain operations do not cast: a bf16 file
    run in fp16 would meet a bf16 weight. Elsewhere every weight already has its dtype and nothing changes."""
    for module in model.modules():
        if is_fp8_layer(module):
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            dtype = getattr(module, f"{name}_comfy_model_dtype", None)
            usable = isinstance(dtype, torch.dtype) and dtype.is_floating_point and not is_fp8_dtype(dtype)
            if usable and param.dtype != dtype and param.dtype.is_floating_point and param.device.type != "meta":
                setattr(module, name, torch.nn.Parameter(param.detach().to(dtype), requires_grad=False))
