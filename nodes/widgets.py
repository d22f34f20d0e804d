"""The nodes' options as ComfyUI widgets, and widget values back into the core's ``UserOptions``.

The allowed values come from ``fp8_quant`` (one list each); this module only adds what the graph editor needs:
lists instead of tuples, defaults, tooltips and the widget order that saved workflows depend on.
"""

from __future__ import annotations

import dataclasses

from fp8_quant.attention import ATTENTION_CHOICES, AttentionChoice
from fp8_quant.choices import CudaGraphs
from fp8_quant.config import (
    AUTO,
    USER_ACTIVATION_GRANULARITIES,
    USER_ACTIVATION_SCHEMES,
    WEIGHT_GRANULARITIES,
    QuantFormat,
    UserOptions,
)
from fp8_quant.kernels import KERNEL_NAMES
from fp8_quant.text_encoder import RECIPES

TOOLTIPS = {
    "activation_scheme": "auto: the file's calibrated input scales where it has them; otherwise each layer is "
    "calibrated at the first sampling step: one static scale (fastest) where its activations allow, a scale per "
    "token where a few tokens are huge. dynamic: a scale per call. static: one scale per layer (the file's, or "
    "learnt at the first step). none: weight-only fp8 (activations stay in high precision; slower, a little more "
    "accurate). On GPUs without FP8 tensor cores activations stay in high precision unless you choose a scheme.",
    "activation_granularity": "For per-call (dynamic) scales: auto = per token, which keeps quiet tokens precise "
    "when a few are huge (DiT activations); tensor = one scale per call; group = per token and 128 inputs (fp8), or "
    "with quant_format int8_rotated one scale per token and 256 inputs on activations and weights (most accurate).",
    "weight_granularity": "For on-the-fly quantization: auto = one scale per tensor where the layer's rows share a "
    "range (the faster kernel, the same precision), else per output channel; where a few input columns are large, "
    "scales fitted to the weight, in groups of 128 inputs where the GPU multiplies those at full speed (H100/H200) "
    "or dequantizes anyway. Or force channel / tensor / block (128x128, DeepSeek-style).",
    "kernel": "auto picks the fastest kernel the GPU supports (FP8 tensor cores need capability 8.9+), else "
    "dequantize + matmul. Forcing one that cannot run a layer falls back, with the reason in the log.",
    "skip_layers": "Extra layers to keep in high precision: names, prefixes, globs (*norm*) or re:regex, comma or "
    "newline separated. Norms, embeddings, modulation and heads are always kept.",
    "te_activation_scheme": "auto: as the recipe says (quality: weight-only, activations in high precision; speed: "
    "a scale per token for the FP8 tensor cores). dynamic / static / none force a scheme.",
    "quant_format": "The 8-bit format of layers quantized on the fly (a file's own 8-bit layers keep theirs). auto: "
    "the GPU's faster one (fp8 with FP8 tensor cores, int8_rotated on RTX 20xx/30xx and A100; on CPUs and older "
    "GPUs, where every layer is dequantized, int8_rotated weights with unrounded activations, the more accurate), "
    "said in the summary. fp8: "
    "e4m3 weights and activations on the FP8 tensor cores (Ada, Hopper, Blackwell). int8_rotated: ComfyUI's "
    "INT8-ConvRot scheme, weights and activations rotated in groups of 256 and rounded to int8 per row; less error "
    "on models with outlier channels, runs on int8 tensor cores (also RTX 30xx / A100).",
    "cuda_graphs": "auto: once the first steps have calibrated the activation scales, each sampling step replays "
    "as a CUDA graph (one launch instead of one per kernel: faster where the GPU waits for the CPU, small models and "
    "images), where that is safe: the whole model on the GPU (not lowvram), no torch.compile, no other node's model "
    "patches or wrappers. Graphs are freed when sampling ends; the console log says how many steps replayed and why "
    "not. off: every step runs as usual.",
    "recipe": "quality: fitted to this encoder on built-in prompts (error-compensating rounding of the weights, the "
    "most sensitive layers kept in bf16 within 0.55x the bf16 bytes, weight-only); seconds on a GPU, a few minutes "
    "on a CPU, once: the fit is kept on disk. speed: the same with activations in fp8 (fp8 x fp8) and, on CUDA, "
    "the encoder replayed as CUDA graphs. plain: per-channel scales, no fitting (fastest to prepare).",
}


SAVE_FORMAT_TOOLTIP = (
    "comfy-quant: fp8 with ComfyUI's .comfy_quant entries (ComfyUI 0.16 and newer); comfy-scaled: the older "
    "scaled-fp8 layout every ComfyUI reads. Both hold one scale per tensor: layers with finer scales are "
    "re-quantized per tensor. weight-scale: every scale as it is, for Load FP8 DiT."
)

SAVE_AFTER_TOOLTIP = (
    "Optional: connect the sampler's output (e.g. KSampler's LATENT) so that the model is saved after sampling in "
    "the same run, with the input scales it calibrated. Without it ComfyUI may save before the sampler runs."
)


def _combo(name: str, values, default: str, tooltip: str | None = None) -> tuple[list[str], dict]:
    return list(values), {"default": default, "tooltip": TOOLTIPS[tooltip or name]}


def _common_inputs() -> dict:
    return {
        "activation_granularity": _combo("activation_granularity", USER_ACTIVATION_GRANULARITIES, AUTO),
        "weight_granularity": _combo("weight_granularity", WEIGHT_GRANULARITIES, AUTO),
        "kernel": _combo("kernel", KERNEL_NAMES, AUTO),
        "skip_layers": ("STRING", {"default": "", "multiline": True, "tooltip": TOOLTIPS["skip_layers"]}),
    }


def loader_optional_inputs() -> dict:
    """Optional inputs of Load FP8 DiT, in widget order (shared workflows store widget values by position:
    ``attention`` came after the others, ``quant_format`` after it, ``cuda_graphs`` last)."""
    from .attention import ATTENTION_TOOLTIP

    return {
        "activation_scheme": _combo("activation_scheme", USER_ACTIVATION_SCHEMES, AUTO),
        **_common_inputs(),
        "attention": (list(ATTENTION_CHOICES), {"default": AttentionChoice.AUTO.value, "tooltip": ATTENTION_TOOLTIP}),
        "quant_format": _combo("quant_format", [fmt.value for fmt in QuantFormat], QuantFormat.AUTO.value),
        "cuda_graphs": _combo("cuda_graphs", [choice.value for choice in CudaGraphs], CudaGraphs.AUTO.value),
    }


def text_encoder_optional_inputs() -> dict:
    """Optional inputs of Quantize Text Encoder (FP8), in widget order (``recipe`` came last, so workflows saved
    before it keep their values in place)."""
    return {
        "activation_scheme": _combo("activation_scheme", USER_ACTIVATION_SCHEMES, AUTO, "te_activation_scheme"),
        **_common_inputs(),
        "recipe": _combo("recipe", RECIPES, "quality"),
    }


def user_options(**widgets: str) -> UserOptions:
    """Widget values as the core's options; a bad value (or an unknown widget) is a ``ValueError`` naming it."""
    known = {option.name for option in dataclasses.fields(UserOptions)}
    unknown = sorted(set(widgets) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; known options: {sorted(known)}")
    return UserOptions(**widgets)


def forced_kernel(kernel: str) -> str | None:
    return None if kernel == AUTO else kernel
