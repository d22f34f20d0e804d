"""The nodes' options as ComfyUI widgets, and widget values back into the core's ``UserOptions``.

The allowed values come from ``fp8_quant`` (one list each); this module only adds what the graph editor needs:
lists instead of tuples, defaults, tooltips and the widget order that saved workflows depend on.
"""

from __future__ import annotations

import dataclasses

from fp8_quant.config import (
    ACTIVATION_SCHEMES,
    AUTO,
    USER_ACTIVATION_GRANULARITIES,
    USER_ACTIVATION_SCHEMES,
    WEIGHT_GRANULARITIES,
    UserOptions,
)
from fp8_quant.kernels import KERNEL_NAMES

# Lists, not tuples: ComfyUI recognises a combo input by its list of options.
ONLINE_ACTIVATION_SCHEMES = [scheme for scheme in ACTIVATION_SCHEMES if scheme != "static"]

TOOLTIPS = {
    "activation_scheme": "auto: the file's own (static where it has input scales), dynamic when quantizing on the "
    "fly. dynamic: a scale per call. static: the file's calibrated input_scale. none: weight-only fp8 (activations "
    "stay bf16; slower than fp8 compute, slightly more accurate).",
    "activation_granularity": "auto: per-token for dynamic, per-tensor for static. Per-token keeps quiet tokens "
    "precise when a few are huge (DiT activations).",
    "weight_granularity": "For on-the-fly quantization: one scale per output channel (channel) or per tensor.",
    "kernel": "auto picks the fastest kernel the GPU supports (FP8 tensor cores need capability 8.9+), else "
    "dequantize + matmul. Forcing one that cannot run a layer falls back, with the reason in the log.",
    "skip_layers": "Extra layers to keep in high precision: names, prefixes, globs (*norm*) or re:regex, comma or "
    "newline separated. Norms, embeddings, modulation and heads are always kept.",
}


def _combo(name: str, values, default: str) -> tuple[list[str], dict]:
    return list(values), {"default": default, "tooltip": TOOLTIPS[name]}


def _common_inputs() -> dict:
    return {
        "activation_granularity": _combo("activation_granularity", USER_ACTIVATION_GRANULARITIES, AUTO),
        "weight_granularity": _combo("weight_granularity", WEIGHT_GRANULARITIES, "channel"),
        "kernel": _combo("kernel", KERNEL_NAMES, AUTO),
        "skip_layers": ("STRING", {"default": "", "multiline": True, "tooltip": TOOLTIPS["skip_layers"]}),
    }


def loader_optional_inputs() -> dict:
    """Optional inputs of Load FP8 DiT, in widget order (shared workflows store widget values by position)."""
    return {"activation_scheme": _combo("activation_scheme", USER_ACTIVATION_SCHEMES, AUTO), **_common_inputs()}


def text_encoder_optional_inputs() -> dict:
    """Optional inputs of Quantize Text Encoder (FP8), in widget order."""
    return {"activation_scheme": _combo("activation_scheme", ONLINE_ACTIVATION_SCHEMES, "dynamic"), **_common_inputs()}


def user_options(**widgets: str) -> UserOptions:
    """Widget values as the core's options; a bad value (or an unknown widget) is a ``ValueError`` naming it."""
    known = {option.name for option in dataclasses.fields(UserOptions)}
    unknown = sorted(set(widgets) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; known options: {sorted(known)}")
    return UserOptions(**widgets)


def forced_kernel(kernel: str) -> str | None:
    return None if kernel == AUTO else kernel
