"""Make ComfyUI importable in a script run under COMFYUI_PYTHON: its path, and CPU mode where there is no GPU.

ComfyUI's ``comfy.model_management`` picks its device when first imported (and asks CUDA, which fails on a
machine without a driver), so the CLI defaults must be set before that import, as ``main.py --cpu`` does.
"""

from __future__ import annotations

import os
import sys


def setup_comfy() -> None:
    comfy_dir = os.environ["COMFYUI_DIR"]
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    import torch
    from comfy.cli_args import args

    if not torch.cuda.is_available():
        args.cpu = True
