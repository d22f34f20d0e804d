"""Load FP8 DiT: any FP8 checkpoint dialect, or a bf16/fp16 one quantized on the fly, as a stock MODEL."""

from __future__ import annotations

import inspect
import logging

import torch

from fp8_quant.formats import CheckpointError, load_checkpoint, scan_checkpoint
from fp8_quant.kernels import explain_choice

from .comfy_cast import comfy_weight_caster
from .ops import LoadPlan, make_fp8_operations
from .options import (
    file_config,
    forced_kernel,
    loader_optional_inputs,
    online_config,
    parse_skip_patterns,
)

logger = logging.getLogger(__name__)

CATEGORY = "loaders/fp8"


class LoadFP8DiT:
    DESCRIPTION = (
        "Loads a diffusion transformer (Wan, LTX, Flux, Qwen-Image, HunyuanVideo, ...) whose linears run in FP8. "
        "FP8 files of every dialect load as they are; bf16/fp16 files are quantized on the fly."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {
            "required": {"unet_name": (folder_paths.get_filename_list("diffusion_models"),)},
            "optional": loader_optional_inputs(),
        }

    def load(
        self,
        unet_name: str,
        activation_scheme: str = "auto",
        activation_granularity: str = "auto",
        weight_granularity: str = "channel",
        kernel: str = "auto",
        skip_layers: str = "",
    ):
        import comfy.model_management
        import comfy.ops
        import comfy.sd
        import comfy.utils
        import folder_paths

        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        try:
            scan = scan_checkpoint(path)
        except CheckpointError as error:
            raise RuntimeError(f"Load FP8 DiT: {error}") from None
        total = len(scan.header.tensors) + len(scan.layers)
        progress = comfy.utils.ProgressBar(total)
        done = [0]

        def step(*_args) -> None:
            done[0] += 1
            progress.update_absolute(min(done[0], total), total)

        try:
            checkpoint = load_checkpoint(path, progress=lambda i, n: step(), scan=scan)
        except CheckpointError as error:
            raise RuntimeError(f"Load FP8 DiT: {error}") from None
        device = comfy.model_management.get_torch_device()
        skip = parse_skip_patterns(skip_layers)
        if checkpoint.config is not None:
            plan = LoadPlan(file_config(checkpoint.config, activation_scheme, activation_granularity), None)
        else:
            config = online_config(activation_scheme, activation_granularity, weight_granularity, skip_layers)
            plan = LoadPlan(None, config, skip_patterns=config.ignored_layers)
        plan.kernel = forced_kernel(kernel)
        plan.skip_patterns = plan.skip_patterns + skip
        plan.quantize_device = device if device.type == "cuda" else None
        plan.progress = lambda name: step()
        plan.weight_caster = comfy_weight_caster()
        plan.report.config = plan.fp8_config or plan.online_config
        operations = make_fp8_operations(comfy.ops.manual_cast, plan)
        # The compute dtype, given explicitly: left to ComfyUI, an fp8 state dict would make it build the
        # non-linear modules (norms, embeddings, convs) in fp8 too, and round their bf16 weights.
        compute_dtype = torch.bfloat16 if comfy.model_management.should_use_bf16(device) else torch.float32
        load_options = {"model_options": {"custom_operations": operations, "dtype": compute_dtype}}
        if "disable_dynamic" in inspect.signature(comfy.sd.load_diffusion_model_state_dict).parameters:
            # ComfyUI's dynamic-VRAM patcher stages weights through buffers of its own that the fp8 forward does
            # not read; the classic patcher (full, partial and lowvram loading) drives these layers.
            load_options["disable_dynamic"] = True
        try:
            model = comfy.sd.load_diffusion_model_state_dict(checkpoint.state_dict, **load_options)
        except (RuntimeError, ValueError) as error:  # a layer that does not fit the model, or holds NaN or ints
            raise RuntimeError(f"Load FP8 DiT: {path}: {error}") from error
        if model is None:
            raise RuntimeError(f"Load FP8 DiT: ComfyUI could not detect the model type of {path}")
        quantized = [layer for layer in model.model.modules() if getattr(layer, "fp8_layer_config", None) is not None]
        if quantized:
            _, plan.report.kernel_choice = explain_choice(quantized[0].fp8_layer_config, device, plan.kernel)
        summary = f"{unet_name} ({scan.dialect}): {plan.report.summary()}"
        logger.info(summary)
        return {"ui": {"text": [summary]}, "result": (model,)}
