"""ComfyUI glue: the nodes and their registration. Everything else lives in ``fp8_quant``."""

from .attention import PatchAttentionFP8
from .loader import LoadFP8DiT
from .save import SaveFP8Model
from .text_encoder import QuantizeTextEncoderFP8

NODE_CLASS_MAPPINGS = {
    "LoadFP8DiT": LoadFP8DiT,
    "QuantizeTextEncoderFP8": QuantizeTextEncoderFP8,
    "SaveFP8Model": SaveFP8Model,
    "PatchAttentionFP8": PatchAttentionFP8,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadFP8DiT": "Load FP8 DiT",
    "QuantizeTextEncoderFP8": "Quantize Text Encoder (FP8)",
    "SaveFP8Model": "Save FP8 Model",
    "PatchAttentionFP8": "Patch Attention (8-bit pack)",
}
