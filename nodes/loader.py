"""Load FP8 DiT: any FP8 checkpoint dialect, or a bf16/fp16 one quantized on the fly, as a stock MODEL."""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator

import torch

from fp8_quant import Fp8Recipe
from fp8_quant.bridge import note_kernel_choice
from fp8_quant.config import unmatched_patterns
from fp8_quant.format_choice import resolve_quant_format
from fp8_quant.formats import load_checkpoint, scan_checkpoint
from fp8_quant.formats.model_writer import architecture_metadata
from fp8_quant.fp8_utils import is_fp8_dtype

from .comfy_cast import comfy_weight_caster
from .comfy_ops import LoadPlan, make_fp8_operations
from .widgets import forced_kernel, loader_optional_inputs, user_options

logger = logging.getLogger(__name__)

CATEGORY = "loaders/fp8"
NODE_TITLE = "Load FP8 DiT"


@contextlib.contextmanager
def node_error(node: str, path: object = None) -> Iterator[None]:
    """Turn any exception into one line naming the node (and the file): the core's ``ValueError``s (bad options,
    bad files, bad layers) as they are, anything unforeseen with its type, its traceback in the console log.

    Out-of-memory errors and ComfyUI's interrupt pass through untouched: ComfyUI frees memory and explains
    out-of-memory itself, and an interrupt must reach its executor to stop the prompt."""
    try:
        yield
        return
    except Exception as error:
        if _passes_through(error):
            raise
        if isinstance(error, ValueError):
            message = str(error)
        else:
            logger.exception("%s failed%s", node, f" on {path}" if path is not None else "")
            message = f"{type(error).__name__}: {error} (details in the console log)"
    message = " ".join(message.split())  # one line: torch's messages span several
    where = f"{path}: " if path is not None and str(path) not in message else ""
    raise RuntimeError(f"{node}: {where}{message}") from None


def _passes_through(error: Exception) -> bool:
    """Out of memory (torch's or Python's) and ComfyUI's ``InterruptProcessingException`` (matched by name: this
    module imports ``comfy`` only inside the nodes)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return any(cls.__name__ == "InterruptProcessingException" for cls in type(error).__mro__)


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

    def load(self, unet_name: str, kernel: str = "auto", attention: str = "auto", **options: str):
        """``options``: the other widgets (activation_scheme, activation_granularity, weight_granularity,
        skip_layers), defaults as in ``UserOptions``; ``attention``: as the Patch Attention node's."""
        import comfy.model_management
        import comfy.utils
        import folder_paths

        from fp8_quant.attention import parse_attention

        from .attention import patch_attention

        device = comfy.model_management.get_torch_device()
        with node_error(NODE_TITLE):
            choices, format_note = resolve_quant_format(user_options(**options), device)
            attention_choice = parse_attention(attention)
            path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        with node_error(NODE_TITLE, path):
            scan = scan_checkpoint(path)
            progress = _Progress(comfy.utils.ProgressBar, len(scan.header.tensors) + len(scan.layers))
            checkpoint = load_checkpoint(path, progress=lambda i, n: progress.step(), scan=scan)
            recipe = Fp8Recipe.for_checkpoint(
                checkpoint.config, choices, forced_kernel(kernel), int8_layers=checkpoint.int8_layers
            )
        plan = LoadPlan(recipe, quantize_device=device if device.type == "cuda" else None)
        plan.result_device = device if keeps_fp8_on_gpu(scan, device) else None
        plan.progress, plan.weight_caster = (lambda name: progress.step()), comfy_weight_caster()
        with node_error(NODE_TITLE, path):
            model = load_fp8_diffusion_model(checkpoint.state_dict, plan, device, scan.header.metadata)
        if model is None:
            raise RuntimeError(f"{NODE_TITLE}: ComfyUI could not detect the model type of {path}")
        model.model.fp8_source_metadata = architecture_metadata(scan.header.metadata)  # for Save FP8 Model
        details = _kernel_summary(model, plan, device)
        unmatched = unmatched_skips_note(NODE_TITLE, choices.skip_layers, plan.report)
        add_calibration_hook(model, plan)
        model, attention_summary = patch_attention(model, attention_choice, in_place=True)  # no node holds it yet
        # The log has the details (patterns, scheme, the kernel's reasoning, the kept layers); the node a short line.
        kept = plan.report.kept_names()
        logger.info("%s (%s): %s%s; %s", unet_name, scan.dialect, details, f"; kept: {kept}" if kept else "",
                    attention_summary)  # fmt: skip
        if format_note is not None and recipe.online is not None and plan.report.quantized:
            attention_summary += f"; {format_note}"  # said only where layers were quantized on the fly
        summary = f"{unet_name} ({scan.dialect}): {plan.report.short_summary()}{unmatched}; {attention_summary}"
        return {"ui": {"text": [summary]}, "result": (model,)}


def unmatched_skips_note(node: str, patterns: tuple[str, ...], report) -> str:
    """``skip_layers`` patterns that named no linear of the model: logged as a warning and said on the node (a
    typo would otherwise keep nothing and say nothing); empty where every pattern matched."""
    unmatched = unmatched_patterns(patterns, (layer.name for layer in report.layers))
    if not unmatched:
        return ""
    listed = ", ".join(repr(pattern) for pattern in unmatched)
    logger.warning("%s: skip_layers %s matched no layer of this model", node, listed)
    return f"; skip_layers {listed} matched no layer"


class _Progress:
    """ComfyUI's progress bar over the read and the layer-by-layer load."""

    def __init__(self, bar_class, total: int) -> None:
        self.bar, self.total, self.done = bar_class(total), total, 0

    def step(self) -> None:
        self.done += 1
        self.bar.update_absolute(min(self.done, self.total), self.total)


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
    import comfy.model_management
    import comfy.ops
    import comfy.sd

    metadata = metadata or None  # as ComfyUI's own file reader gives it: None for a file without metadata
    compute_dtype, supported = comfy_dtypes(state_dict, metadata)
    cast_to = comfy.model_management.unet_manual_cast(compute_dtype, device, supported)
    base = comfy.ops.disable_weight_init if cast_to is None else comfy.ops.manual_cast
    operations = make_fp8_operations(base, plan)
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


def cast_every_call(model: torch.nn.Module) -> None:
    """ComfyUI's weight cast at every call for each of its modules in ``model`` (not the fp8 layers): for a model
    that ComfyUI feeds activations of another dtype than its weights'."""
    for module in model.modules():
        if hasattr(module, "comfy_cast_weights") and getattr(module, "fp8_method", None) is None:
            module.comfy_cast_weights = True


def store_in_built_dtypes(model: torch.nn.Module) -> None:
    """Weights in the dtype ComfyUI built each module for (it records it as ``<name>_comfy_model_dtype``).

    Where ComfyUI's dynamic VRAM is enabled, its linears and embeddings take a file's tensors as they are (its own
    patcher casts them later); this pack's classic patcher does not, and plain operations do not cast: a bf16 file
    run in fp16 would meet a bf16 weight. Elsewhere every weight already has its dtype and nothing changes."""
    for module in model.modules():
        if getattr(module, "fp8_method", None) is not None:
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            dtype = getattr(module, f"{name}_comfy_model_dtype", None)
            usable = isinstance(dtype, torch.dtype) and dtype.is_floating_point and not is_fp8_dtype(dtype)
            if usable and param.dtype != dtype and param.dtype.is_floating_point and param.device.type != "meta":
                setattr(module, name, torch.nn.Parameter(param.detach().to(dtype), requires_grad=False))


def keeps_fp8_on_gpu(scan, device: torch.device) -> bool:
    """Whether the fp8 layers stay on the GPU where they were quantized: where the whole fp8 model takes under half
    of the free VRAM and ComfyUI manages memory normally, it would load the model there next anyway, and a round
    trip through host memory would double the transfers of loading. Elsewhere (low VRAM, dynamic VRAM, the CPU) the
    layers go to the host, as ComfyUI's own loader leaves a model until it is needed."""
    import comfy.model_management

    if device.type != "cuda" or _dynamic_vram_on():
        return False
    states = comfy.model_management.VRAMState
    if comfy.model_management.vram_state not in (states.NORMAL_VRAM, states.HIGH_VRAM):
        return False
    fp8_bytes = sum(layer.weight.numel for layer in scan.layers.values())  # at most one byte per weight
    return fp8_bytes < 0.5 * comfy.model_management.get_free_memory(device)


def _dynamic_vram_on() -> bool:
    try:
        import comfy.memory_management
    except ImportError:  # older ComfyUI: no dynamic VRAM
        return False
    return bool(getattr(comfy.memory_management, "aimdo_enabled", False))


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


CALIBRATION_WRAPPER_KEY = "fp8_quant.calibration"


def add_calibration_hook(patcher, plan: LoadPlan) -> None:
    """Once per ``apply_model`` call, outside any ``torch.compile`` region (ComfyUI runs model wrappers around the
    compiled module), the learnt activation scales of layers that run compiled get their host bookkeeping
    (``CalibrationTally.after_model_call``). Eager layers do theirs per call and need none of this."""
    tallies = {id(method.calibration): method.calibration for method in plan.recipe.methods()}
    if not tallies or not hasattr(patcher, "add_wrapper_with_key"):
        return
    import comfy.patcher_extension

    def calibration_wrapper(executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        for tally in tallies.values():
            tally.after_model_call()
        return out

    apply_model = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    patcher.add_wrapper_with_key(apply_model, CALIBRATION_WRAPPER_KEY, calibration_wrapper)


def _kernel_summary(model, plan: LoadPlan, device: torch.device) -> str:
    """The report's line, with the kernel choice; every layer's kernels are chosen now, for the compute device."""
    quantized = [layer for layer in model.model.modules() if getattr(layer, "fp8_layer_config", None) is not None]
    for layer in quantized:
        layer.fp8_method.prepare_kernels(layer, device)
    if quantized:
        note_kernel_choice(plan.report, quantized, device, plan.recipe.kernel)
    return plan.report.summary()
