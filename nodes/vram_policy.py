"""ComfyUI's VRAM policy as it bears on loading: where the fp8 layers go once they are made."""

from __future__ import annotations

import torch


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
