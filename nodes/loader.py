"""Load FP8 DiT: any FP8 checkpoint dialect, or a bf16/fp16 one quantized on the fly, as a stock MODEL."""

from __future__ import annotations

import logging

from fp8_quant import Fp8Recipe
from fp8_quant.choices import CUDA_GRAPHS
from fp8_quant.formats import load_checkpoint, scan_checkpoint
from fp8_quant.formats.model_writer import architecture_metadata

from .calibration_hook import add_calibration_hook
from .comfy_cast import comfy_weight_caster
from .comfy_ops import LoadPlan
from .common import CATEGORY, node_error, unmatched_skips_note
from .dit_model import load_fp8_diffusion_model
from .step_graphs import add_step_graphs
from .vram_policy import keeps_fp8_on_gpu
from .widgets import forced_kernel, loader_optional_inputs, user_options

logger = logging.getLogger(__name__)

NODE_TITLE = "Load FP8 DiT"
__all__ = ["CATEGORY", "LoadFP8DiT", "load_fp8_diffusion_model", "node_error"]


class LoadFP8DiT:
    DESCRIPTION = (
        "Loads a diffusion transformer (Wan, LTX, Flux, Qwen-Image, HunyuanVideo, ...) whose linears run in FP8. "
        "FP8 files of every dialect and ComfyUI's int8 files (int8_tensorwise, with or without ConvRot) load as they "
        "are; bf16/fp16 files are quantized on the fly."
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
        self, unet_name: str, kernel: str = "auto", attention: str = "auto", cuda_graphs: str = "auto", **options: str
    ):
        """``options``: the other widgets (activation_scheme, activation_granularity, weight_granularity,
        skip_layers), defaults as in ``UserOptions``; ``attention``: as the Patch Attention node's; ``cuda_graphs``:
        whether sampling steps may replay as CUDA graphs (``fp8_quant.step_graphs``)."""
        import comfy.model_management
        import comfy.utils
        import folder_paths

        from fp8_quant.attention import parse_attention

        from .attention import patch_attention

        device = comfy.model_management.get_torch_device()
        with node_error(NODE_TITLE):
            choices = user_options(**options)
            attention_choice = parse_attention(attention)
            graphs_choice = CUDA_GRAPHS.parse(cuda_graphs)
            path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        with node_error(NODE_TITLE, path):
            scan = scan_checkpoint(path)
            progress = _Progress(comfy.utils.ProgressBar, len(scan.header.tensors) + len(scan.layers))
            checkpoint = load_checkpoint(path, progress=lambda i, n: progress.step(), scan=scan)
            recipe = Fp8Recipe.for_checkpoint(
                checkpoint.config, choices, forced_kernel(kernel), int8_layers=checkpoint.int8_layers, device=device
            )
        plan = LoadPlan(recipe, quantize_device=device if device.type == "cuda" else None)
        plan.result_device = device if keeps_fp8_on_gpu(scan, device) else None
        plan.progress, plan.weight_caster = (lambda name: progress.step()), comfy_weight_caster()
        with node_error(NODE_TITLE, path):
            model = load_fp8_diffusion_model(checkpoint.state_dict, plan, device, scan.header.metadata)
        if model is None:
            raise RuntimeError(f"{NODE_TITLE}: ComfyUI could not detect the model type of {path}")
        model.model.fp8_source_metadata = architecture_metadata(scan.header.metadata)  # for Save FP8 Model
        details = plan.prepare_kernels(model.model, device)
        unmatched = unmatched_skips_note(NODE_TITLE, choices.skip_layers, plan.report)
        add_calibration_hook(model, plan)
        model, attention_summary = patch_attention(model, attention_choice, in_place=True)  # no node holds it yet
        graphs_summary = add_step_graphs(model, graphs_choice, device)
        attention_summary += f"; {graphs_summary}" if graphs_summary else ""
        # The log has the details (patterns, scheme, the kernel's reasoning, the kept layers); the node a short line.
        kept = plan.report.kept_names()
        logger.info("%s (%s): %s%s; %s", unet_name, scan.dialect, details, f"; kept: {kept}" if kept else "",
                    attention_summary)  # fmt: skip
        if recipe.format_note is not None and plan.report.quantized:
            attention_summary += f"; {recipe.format_note}"  # said only where layers were quantized on the fly
        summary = f"{unet_name} ({scan.dialect}): {plan.report.short_summary()}{unmatched}; {attention_summary}"
        return {"ui": {"text": [summary]}, "result": (model,)}


class _Progress:
    """ComfyUI's progress bar over the read and the layer-by-layer load."""

    def __init__(self, bar_class, total: int) -> None:
        self.bar, self.total, self.done = bar_class(total), total, 0

    def step(self) -> None:
        self.done += 1
        self.bar.update_absolute(min(self.done, self.total), self.total)
