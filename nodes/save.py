"""Save FP8 Model: write the model from Load FP8 DiT as it runs (fp8 weights, scales, calibrated input scales, layers
kept in high precision) to ``models/diffusion_models``, in a format ComfyUI's stock loader reads."""

from __future__ import annotations

import inspect
import logging
import os
import time

from fp8_quant.formats.dialects import COMFY_QUANT, OUTPUT_FORMATS
from fp8_quant.formats.model_writer import learnt_input_scale, save_quantized_model
from fp8_quant.layer_state import fp8_layers, is_fp8_layer
from fp8_quant.messages import printable

from .common import CATEGORY, node_error
from .widgets import SAVE_AFTER_TOOLTIP, SAVE_FORMAT_TOOLTIP

logger = logging.getLogger(__name__)
NODE_TITLE = "Save FP8 Model"
KEY_PREFIX = "model.diffusion_model."  # what ComfyUI's own checkpoint savers write, and its loaders detect
ANY_TYPE = "*"  # ComfyUI's name for an input that takes any type (both 0.16 and 0.30 accept it)

# The widget's default (new nodes; saved workflows keep their value): the dialect that holds int8 layers too.
NODE_DEFAULT_FORMAT = str(COMFY_QUANT)


class SaveFP8Model:
    DESCRIPTION = (
        "Saves a model from Load FP8 DiT as it runs now: fp8 weights and scales, the input scales it calibrated "
        "while sampling, LoRA patches applied. In the same graph as the sampler, connect the sampler's output to "
        "'after' so the model is saved once sampling is done. Run again with nothing changed, it writes no second "
        "copy and says which file already holds this model. The file goes to models/diffusion_models and loads "
        "with the stock Load Diffusion Model node. Int8 layers are written as ComfyUI 0.30's int8_tensorwise "
        "(comfy-quant format only)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A model from Load FP8 DiT (sample with it first to calibrate)."}),
                "filename_prefix": ("STRING", {"default": "fp8/ComfyUI"}),
            },
            "optional": {
                "format": (list(OUTPUT_FORMATS), {"default": NODE_DEFAULT_FORMAT, "tooltip": SAVE_FORMAT_TOOLTIP}),
                # ComfyUI's "any type": an input that only orders this node after the one it comes from.
                "after": (ANY_TYPE, {"tooltip": SAVE_AFTER_TOOLTIP}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, **inputs):
        """Run at every queue: ComfyUI would otherwise serve an unchanged graph's save from its cache, showing the
        earlier summary as if it had saved again. ``save`` itself finds out whether the model changed."""
        return float("nan")

    def save(self, model, filename_prefix: str, format: str = NODE_DEFAULT_FORMAT, after=None):
        import comfy.model_management
        import folder_paths

        diffusion_model = model.model.diffusion_model
        if not any(is_fp8_layer(module) for module in diffusion_model.modules()):
            raise RuntimeError(f"{NODE_TITLE}: this model has no FP8 layers to save; connect Load FP8 DiT's MODEL")
        state = _model_state(model, filename_prefix, format)
        earlier = _WRITTEN.get(state)
        if earlier is not None and os.path.isfile(earlier[0]):
            summary = (
                f"{os.path.basename(earlier[0])} already holds this model (written at {earlier[1]}; nothing changed "
                "since): not written again. Sample again or change an input to save a new file."
            )
            logger.info("%s: %s", NODE_TITLE, summary)
            return {"ui": {"text": [summary]}}
        folder = _diffusion_models_folder(folder_paths.get_folder_paths("diffusion_models"))
        with node_error(NODE_TITLE):
            check_prefix(filename_prefix, folder)
            directory, name, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, folder)
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, f"{name}_{counter:05}_.safetensors")
            _load_with_patches(comfy.model_management, model)
            try:  # a new name: overwrite=False makes a second save racing for it an error, not a replacement
                report = save_quantized_model(
                    diffusion_model,
                    path,
                    format,
                    key_prefix=KEY_PREFIX,
                    params_of=_current_params,
                    metadata=getattr(model.model, "fp8_source_metadata", None),  # the architecture Load FP8 DiT read
                    overwrite=False,
                )
            except OSError as error:  # a full disk, a read-only folder: one line naming the file
                raise ValueError(f"{printable(error.filename or path)}: {error.strerror or error}") from None
        _WRITTEN[state] = (path, time.strftime("%H:%M:%S"))
        summary = report.summary()
        logger.info("%s: %s", NODE_TITLE, summary)
        return {"ui": {"text": [summary]}}


# What this process has written: the model's state (see ``_model_state``) -> (file, time of day).
_WRITTEN: dict[tuple, tuple[str, str]] = {}


def _model_state(model, filename_prefix: str, output_format: str) -> tuple:
    """What decides the file's content: the model object, its weight patches (LoRA; ComfyUI gives each set a new
    ``patches_uuid``), every layer's input scale as it was learnt so far, and the node's own choices."""
    layers = [module for _, module in fp8_layers(model.model.diffusion_model)]
    scales = tuple(None if scale is None else float(scale) for scale in map(learnt_input_scale, layers))
    patches = str(getattr(model, "patches_uuid", ""))
    return id(model.model), patches, scales, filename_prefix, output_format


def check_prefix(prefix: str, folder: str) -> None:
    """``filename_prefix`` names a file inside ``folder``: no absolute path, no ``..`` out of it (links
    resolved), said as the option's error rather than ComfyUI's multi-line refusal."""
    inside = os.path.realpath(folder)
    target = os.path.realpath(os.path.join(inside, prefix))
    parts = prefix.replace("\\", "/").split("/")
    if os.path.isabs(prefix) or ".." in parts or os.path.commonpath([inside, target]) != inside:
        raise ValueError(
            f"filename_prefix: {prefix!r} must name a file inside models/diffusion_models "
            "(a relative path such as fp8/ComfyUI, without '..')"
        )


def _diffusion_models_folder(folders: list[str]) -> str:
    """``models/diffusion_models`` (ComfyUI lists the legacy ``models/unet`` first)."""
    return next((folder for folder in folders if os.path.basename(folder) == "diffusion_models"), folders[0])


def _load_with_patches(model_management, model) -> None:
    """Load the model as the stock savers do, with LoRA and other weight patches applied to the weights."""
    parameters = inspect.signature(model_management.load_models_gpu).parameters
    options = {"force_patch_weights": True} if "force_patch_weights" in parameters else {}
    model_management.load_models_gpu([model], **options)


def _current_params(layer):
    """A layer's tensors as it runs: a LoRA-patched weight comes with the scale it was quantized with."""
    return layer.fp8_params()
