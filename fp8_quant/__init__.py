"""fp8_quant: FP8 (e4m3) linears for PyTorch models, with a Config -> Method -> Kernel design.

Never imports ComfyUI; the ComfyUI nodes of this pack are thin glue over it.
"""

from .bridge import clone_module_tree, prepare_model_for_fp8
from .config import SENSITIVE_LAYER_PATTERNS, Fp8Config, UserOptions, is_layer_skipped
from .dispatch import Fp8Recipe, LayerDecision
from .fp8_utils import is_fp8_dtype, quantize_input_dynamic, quantize_input_static, supports_fp8_compute
from .methods import Fp8LinearMethod, Fp8OnlineLinearMethod
from .params import Fp8LinearParams
from .quant_fp8 import QuantFP8
from .report import Fp8Report, LayerReport
from .scheme import GroupShape, QuantKey, ScaleDesc
from .text_encoder import quantize_text_encoder

__all__ = [
    "SENSITIVE_LAYER_PATTERNS",
    "Fp8Config",
    "Fp8LinearMethod",
    "Fp8LinearParams",
    "Fp8OnlineLinearMethod",
    "Fp8Recipe",
    "Fp8Report",
    "GroupShape",
    "LayerDecision",
    "LayerReport",
    "QuantFP8",
    "QuantKey",
    "ScaleDesc",
    "UserOptions",
    "clone_module_tree",
    "is_fp8_dtype",
    "is_layer_skipped",
    "prepare_model_for_fp8",
    "quantize_input_dynamic",
    "quantize_input_static",
    "quantize_text_encoder",
    "supports_fp8_compute",
]
