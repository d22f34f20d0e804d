"""Make ComfyUI importable in a script run under COMFYUI_PYTHON: its path, CPU mode where there is no GPU, and
optionally ComfyUI's dynamic VRAM (what ``main.py`` turns on by default on NVIDIA GPUs).

ComfyUI's ``comfy.model_management`` picks its device when first imported (and asks CUDA, which fails on a
machine without a driver), so the CLI defaults must be set before that import, as ``main.py --cpu`` does.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def import_pack(repo: Path):
    """The pack under a package name of its own, as ComfyUI imports custom nodes (its ``nodes`` package would
    clash with ComfyUI's ``nodes`` module otherwise)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "comfyui_fp8_quant", repo / "__init__.py", submodule_search_locations=[str(repo)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_fp8_quant"] = module
    spec.loader.exec_module(module)
    return module


def setup_comfy(dynamic_vram: bool = False) -> bool:
    """Returns whether dynamic VRAM is on (it needs a CUDA GPU and a working comfy-aimdo)."""
    comfy_dir = os.environ["COMFYUI_DIR"]
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    import torch
    from comfy.cli_args import args

    if not torch.cuda.is_available():
        args.cpu = True
        return False
    if not dynamic_vram:
        return False
    import comfy_aimdo.control

    for init_arguments in ({"simple_vram_headroom": None, "nvml_pressure": True}, {"simple_vram_headroom": None}, {}):
        try:
            comfy_aimdo.control.init(**init_arguments)
            break
        except TypeError:
            continue
    import comfy.memory_management
    import comfy.model_management
    import comfy.model_patcher

    devices = comfy.model_management.get_all_torch_devices()
    try:
        initialized = comfy_aimdo.control.init_devices((device.index, 0) for device in devices)
    except TypeError:
        initialized = comfy_aimdo.control.init_devices(device.index for device in devices)
    if not initialized:
        logging.warning("comfy-aimdo did not start: dynamic VRAM stays off")
        return False
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    return True
