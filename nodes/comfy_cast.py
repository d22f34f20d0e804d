"""ComfyUI's weight casting for offloaded layers, wrapped as a ``WeightCaster`` for the fp8 layers.

ComfyUI moves the weights of layers left on the offload device (lowvram) with ``comfy.ops.cast_bias_weight``:
offload streams and pinned buffers, so the next layer's weight travels while this one computes. The fp8 layers
use the same path, asking for the weight in its stored fp8 dtype (half the bytes of bf16 over PCIe).
"""

from __future__ import annotations

import inspect
import logging

from .fp8_linear import WeightCaster

logger = logging.getLogger(__name__)


def comfy_weight_caster() -> WeightCaster | None:
    """``None`` where this ComfyUI has no offloadable cast (older versions): the layers then copy per call."""
    import comfy.ops

    cast_bias_weight = getattr(comfy.ops, "cast_bias_weight", None)
    uncast_bias_weight = getattr(comfy.ops, "uncast_bias_weight", None)
    if cast_bias_weight is None or uncast_bias_weight is None:
        return None
    parameters = inspect.signature(cast_bias_weight).parameters
    if not {"offloadable", "bias_dtype", "dtype"} <= parameters.keys():
        logger.info("this ComfyUI's cast_bias_weight cannot offload asynchronously; fp8 layers copy per call")
        return None

    def cast(layer, x):
        return cast_bias_weight(layer, x, dtype=layer.weight.dtype, bias_dtype=x.dtype, offloadable=True)

    return WeightCaster(cast=cast, uncast=uncast_bias_weight)
