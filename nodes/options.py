"""Node options -> fp8_quant configs. Shared by both nodes so that the same words mean the same thing."""

from __future__ import annotations

from fp8_quant import SENSITIVE_LAYER_PATTERNS, Fp8Config
from fp8_quant.kernels import KERNEL_NAMES

# Lists, not tuples: ComfyUI recognises a combo input by its list of options.
ACTIVATION_SCHEMES = ["auto", "dynamic", "static", "none"]
ONLINE_ACTIVATION_SCHEMES = ["dynamic", "none"]
ACTIVATION_GRANULARITIES = ["auto", "token", "tensor"]
WEIGHT_GRANULARITIES = ["channel", "tensor"]
KERNELS = list(KERNEL_NAMES)

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


def _common_inputs() -> dict:
    return {
        "activation_granularity": (
            ACTIVATION_GRANULARITIES,
            {"default": "auto", "tooltip": TOOLTIPS["activation_granularity"]},
        ),
        "weight_granularity": (WEIGHT_GRANULARITIES, {"default": "channel", "tooltip": TOOLTIPS["weight_granularity"]}),
        "kernel": (KERNELS, {"default": "auto", "tooltip": TOOLTIPS["kernel"]}),
        "skip_layers": ("STRING", {"default": "", "multiline": True, "tooltip": TOOLTIPS["skip_layers"]}),
    }


def loader_optional_inputs() -> dict:
    """Optional inputs of Load FP8 DiT, in widget order (shared workflows store widget values by position)."""
    scheme = {"activation_scheme": (ACTIVATION_SCHEMES, {"default": "auto", "tooltip": TOOLTIPS["activation_scheme"]})}
    return {**scheme, **_common_inputs()}


def text_encoder_optional_inputs() -> dict:
    """Optional inputs of Quantize Text Encoder (FP8), in widget order."""
    scheme = {
        "activation_scheme": (
            ONLINE_ACTIVATION_SCHEMES,
            {"default": "dynamic", "tooltip": TOOLTIPS["activation_scheme"]},
        )
    }
    return {**scheme, **_common_inputs()}


def parse_skip_patterns(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.replace("\n", ",").split(",") if p.strip())


def online_config(
    activation_scheme: str = "auto",
    activation_granularity: str = "auto",
    weight_granularity: str = "channel",
    skip_layers: str = "",
) -> Fp8Config:
    """Config for quantizing a bf16/fp16 model: e4m3fn, per-channel weights, dynamic per-token by default."""
    scheme = "dynamic" if activation_scheme == "auto" else activation_scheme
    if scheme == "static":
        raise ValueError(
            "activation_scheme 'static' needs calibrated input scales from an fp8 file; use dynamic or none "
            "for on-the-fly quantization"
        )
    granularity = "token" if activation_granularity == "auto" else activation_granularity
    return Fp8Config(
        weight_granularity=weight_granularity,
        activation_scheme=scheme,
        activation_granularity=granularity,
        ignored_layers=SENSITIVE_LAYER_PATTERNS + parse_skip_patterns(skip_layers),
    )


def file_config(
    inferred: Fp8Config, activation_scheme: str = "auto", activation_granularity: str = "auto"
) -> Fp8Config:
    """The file's own config with the user's overrides for activations."""
    values = inferred.to_dict()
    if activation_scheme != "auto":
        values["activation_scheme"] = activation_scheme
    if activation_granularity != "auto":
        values["activation_granularity"] = activation_granularity
    elif values["activation_scheme"] == "static":
        values["activation_granularity"] = "tensor"
    elif values["activation_scheme"] == "dynamic":
        values["activation_granularity"] = "token"
    if values["activation_scheme"] == "static" and inferred.activation_scheme != "static":
        raise ValueError("activation_scheme 'static' needs input scales in the file, and this file has none")
    return Fp8Config.from_dict(values)


def forced_kernel(kernel: str) -> str | None:
    return None if kernel == "auto" else kernel
