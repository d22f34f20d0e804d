"""Run under ComfyUI's Python (COMFYUI_PYTHON) with COMFYUI_DIR on sys.path: writes tiny random models.

Usage: python comfy_fixtures.py wan|wan_outliers|wan_config|flux|ltxv OUT.safetensors
       python comfy_fixtures.py comfy-quantize FORMAT SOURCE.safetensors OUT.safetensors
DiTs of width 256 built with ComfyUI's own classes, so ComfyUI detects them from their keys and shapes.
``wan_outliers`` is the Wan model with a few large input columns in its block linears. ``wan_config`` is a Wan whose
head count and text width its weights cannot tell (4 heads of 64, text width 768): the file's safetensors metadata
``config`` says them, as ComfyUI reads it. ``ltxv`` is a Lightricks LTX-Video DiT (32 heads of 8).
``comfy-quantize`` writes a file the way ComfyUI itself saves quantized layers (its quantizer, its state dict,
``.comfy_quant``), for the block linears of SOURCE, in one of ComfyUI's formats (mxfp8, nvfp4, int8_tensorwise,
float8_e4m3fn) or an int8 variant (``INT8_VARIANTS``: per-channel scales, ConvRot).
"""

from __future__ import annotations

import sys

import torch
from comfy_runtime import setup_comfy


def wan_model(operations, **sizes) -> torch.nn.Module:
    """A Wan 2.1 text-to-video DiT, 2 blocks of width 256 unless ``sizes`` (dim, ffn_dim, num_heads, num_layers,
    text_dim, dtype, device) say otherwise."""
    from comfy.ldm.wan.model import WanModel

    options = {"dim": 256, "ffn_dim": 512, "num_heads": 2, "num_layers": 2, "text_len": 32, "text_dim": 4096}
    options.update({"dtype": torch.float32, "device": "cpu", **sizes})
    return WanModel(
        model_type="t2v",
        patch_size=(1, 2, 2),
        in_dim=16,
        freq_dim=256,
        out_dim=16,
        operations=operations,
        **options,
    )


def flux_model(operations, **sizes) -> torch.nn.Module:
    """A Flux.1-dev DiT (heads of 128, Flux's rotary split) with guidance and pooled-vector inputs: 2 heads, 2 double
    and 2 single blocks unless ``sizes`` (hidden_size, num_heads, depth, depth_single_blocks, dtype, device) say
    otherwise."""
    from comfy.ldm.flux.model import Flux, FluxParams

    options = {"hidden_size": 256, "num_heads": 2, "depth": 2, "depth_single_blocks": 2}
    options.update({"dtype": torch.float32, "device": "cpu", **sizes})
    if "txt_ids_dims" not in getattr(FluxParams, "__dataclass_fields__", {"txt_ids_dims": None}):
        extra = {}  # older ComfyUI's Flux has no such parameter
    else:
        extra = {"txt_ids_dims": []}
    return Flux(
        image_model="flux",
        in_channels=16,
        out_channels=16,
        vec_in_dim=768,
        context_in_dim=4096,
        mlp_ratio=4.0,
        axes_dim=[16, 56, 56],
        theta=10000,
        patch_size=2,
        qkv_bias=True,
        guidance_embed=True,
        operations=operations,
        **extra,
        **options,
    )


def ltxv_model(operations, **sizes) -> torch.nn.Module:
    """A Lightricks LTX-Video DiT: ComfyUI detects 32 heads and reads their width from the cross-attention's keys,
    so 32 heads of 8 give width 256; 2 blocks unless ``sizes`` say otherwise."""
    from comfy.ldm.lightricks.model import LTXVModel

    options = {"num_layers": 2, "dtype": torch.float32, "device": "cpu", **sizes}
    return LTXVModel(
        in_channels=128,
        cross_attention_dim=256,
        attention_head_dim=8,
        num_attention_heads=32,
        caption_channels=4096,
        operations=operations,
        **options,
    )


# What ComfyUI cannot read from ``wan_config``'s weights: its detection takes dim // 128 heads and a text width of
# 4096 unless the file's metadata says otherwise.
WAN_CONFIG = {"num_heads": 4, "text_dim": 768}

MODELS = {"wan": wan_model, "flux": flux_model, "ltxv": ltxv_model}
# Fixture kinds: the model, its sizes, the ``randomize_dit`` options on top of the channel spread every fixture
# has, and the ``transformer`` part of the file's metadata ``config`` (None: no metadata).
FIXTURES = {
    "wan": ("wan", {}, {}, None),
    "flux": ("flux", {}, {}, None),
    "wan_outliers": ("wan", {}, {"outlier_columns": 4}, None),
    "wan_config": ("wan", WAN_CONFIG, {}, WAN_CONFIG),
    "ltxv": ("ltxv", {}, {}, None),
}


def write_tiny_dit(kind: str, path: str) -> None:
    """Random weights (``randomize_dit``) saved in bf16 with ComfyUI's checkpoint key prefix (and metadata)."""
    setup_comfy()
    import json

    import comfy.ops
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model_kind, sizes, options, transformer_config = FIXTURES[kind]
    model = MODELS[model_kind](comfy.ops.disable_weight_init, **sizes)
    randomize_dit(model, channel_spread=True, **options)
    state = {f"model.diffusion_model.{k}": v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    metadata = None if transformer_config is None else {"config": json.dumps({"transformer": transformer_config})}
    save_file(state, path, metadata=metadata)


BLOCK_PREFIXES = ("blocks.", "double_blocks.", "single_blocks.", "transformer_blocks.")  # Wan, Flux, LTX


def randomize_dit(
    model: torch.nn.Module, channel_spread: bool, outlier_columns: int = 0, outlier_factor: float = 8.0
) -> None:
    """Random weights of sensible scale: norms at 1, small biases, weights ~ 1/sqrt(fan_in).

    ``channel_spread``: output channels of very different magnitudes, as real checkpoints have: that is where
    per-channel scales beat a plain fp8 cast. ``outlier_columns``: that many input columns of each block linear,
    chosen at random, ``outlier_factor`` times larger, as trained DiTs have along some input channels: a column
    that crosses every row sets every row's scale.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.normal_(0, 0.02)
            else:
                param.normal_(0, 1.0 / max(1, param.shape[-1]) ** 0.5)
                if channel_spread and param.dim() == 2 and name.startswith(BLOCK_PREFIXES):
                    param.mul_(torch.logspace(-1.5, 0.5, param.shape[0], device=param.device)[:, None])
                if outlier_columns and param.dim() == 2 and name.startswith(BLOCK_PREFIXES):
                    param[:, torch.randperm(param.shape[1])[:outlier_columns]] *= outlier_factor


FORMAT_UNKNOWN = 3  # exit status: the ComfyUI under test has no such format (older than the format)
# int8_tensorwise as ComfyUI's quantizer writes it: (from_float options, the .comfy_quant entry's extra fields).
INT8_VARIANTS = {
    "int8_tensorwise": ({}, {}),
    "int8_channel": ({"per_channel": True}, {}),
    "int8_convrot": ({"per_channel": True, "convrot": True}, {"convrot": True, "convrot_groupsize": 256}),
    "int8_convrot64": (
        {"per_channel": True, "convrot": True, "convrot_groupsize": 64},
        {"convrot": True, "convrot_groupsize": 64},
    ),
}


def write_comfy_quantized(fmt: str, source: str, path: str) -> None:
    """The block linears of ``source`` quantized by ComfyUI's own code into ``fmt``, saved as its checkpoint
    savers do (``QuantizedTensor.state_dict`` and a ``.comfy_quant`` JSON per layer); the rest as it is."""
    setup_comfy()
    import json

    from safetensors.torch import load_file, save_file

    try:
        from comfy.quant_ops import QUANT_ALGOS, QuantizedTensor
    except ImportError:  # ComfyUI before its quantized-tensor layer
        QUANT_ALGOS = {}
    options, extra = INT8_VARIANTS.get(fmt, ({}, {}))
    if fmt in INT8_VARIANTS:
        fmt = "int8_tensorwise"
    if fmt not in QUANT_ALGOS:
        print(f"this ComfyUI has no {fmt} format", file=sys.stderr)
        sys.exit(FORMAT_UNKNOWN)

    state = load_file(source)
    out: dict[str, torch.Tensor] = {}
    entry = list(json.dumps({"format": fmt, **extra}).encode())
    for key, value in state.items():
        layer = key.removesuffix(".weight")
        if key.endswith(".weight") and value.dim() == 2 and ".blocks." in key:
            quantized = QuantizedTensor.from_float(value.float(), QUANT_ALGOS[fmt]["comfy_tensor_layout"], **options)
            out.update(quantized.state_dict(key))
            out[f"{layer}.comfy_quant"] = torch.tensor(entry, dtype=torch.uint8)
        else:
            out[key] = value
    save_file({key: value.contiguous() for key, value in out.items()}, path)


if __name__ == "__main__":
    if sys.argv[1] == "comfy-quantize":
        write_comfy_quantized(*sys.argv[2:5])
    else:
        write_tiny_dit(sys.argv[1], sys.argv[2])
