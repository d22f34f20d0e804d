"""ComfyUI FP8 Quant: the entry point ComfyUI imports from custom_nodes/."""

import os
import sys

# fp8_quant is imported by its own name; appended (not prepended) so ComfyUI's top-level modules win.
_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.append(_PACK_DIR)

WEB_DIRECTORY = "./web"

if __package__:  # imported as a package, as ComfyUI imports custom nodes
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # imported as a plain module (pytest walking a checkout whose folder name is no package name)
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
