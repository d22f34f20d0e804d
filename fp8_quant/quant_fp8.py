"""QuantFP8: activation quantization, dynamic or static, per tensor or per token.

On CUDA a fused Triton kernel reads each row once for its amax and once for the cast (the row stays in L2),
instead of the four passes of the eager expression; that overhead is what separates a dynamic FP8 linear
from the raw ``_scaled_mm`` speed. Elsewhere, and inside ``torch.compile`` (where Inductor fuses the eager
expression into the ops around it and a hand-launched Triton kernel would only stand in its way), the eager
helpers of ``fp8_utils`` are used; both give the same numbers up to the last fp8 rounding.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from . import fp8_utils
from .scheme import PER_TENSOR, PER_TOKEN, GroupShape, QuantKey

logger = logging.getLogger(__name__)

DISABLE_TRITON_ENV = "FP8_QUANT_DISABLE_TRITON"


class QuantFP8:
    """Quantize activations ``[..., K]`` to fp8.

    ``__call__(x, scale=None, amax_out=None)`` returns ``(x_fp8, scale)`` where ``x_fp8`` has ``x``'s shape and
    ``scale`` is ``[..., 1]`` per token or ``[]`` per tensor. Static quantization needs ``scale`` and, given
    ``amax_out`` (a float32 one-element tensor), also raises it to ``x``'s amax in the same pass; dynamic ignores
    both.
    """

    def __init__(
        self,
        static: bool,
        group_shape: GroupShape,
        dtype: torch.dtype = torch.float8_e4m3fn,
        use_triton: bool | None = None,
    ) -> None:
        if group_shape not in (PER_TENSOR, PER_TOKEN):
            raise ValueError(f"QuantFP8 supports per-tensor and per-token groups, not {group_shape}")
        if static and group_shape != PER_TENSOR:
            raise ValueError("static activation quantization is per-tensor (one calibrated scale)")
        fp8_utils.fp8_max(dtype)  # validates the dtype
        self.static = static
        self.per_token = group_shape == PER_TOKEN
        self.dtype = dtype
        # Decided once: the environment and the import are not looked at again on the hot path.
        disabled = os.environ.get(DISABLE_TRITON_ENV, "") not in ("", "0")
        self.use_triton = use_triton is not False and not disabled and _triton_available()

    @classmethod
    def from_key(cls, key: QuantKey, use_triton: bool | None = None) -> QuantFP8:
        return cls(key.scale.static, key.scale.group_shape, key.dtype, use_triton)

    def __call__(
        self, x: torch.Tensor, scale: torch.Tensor | None = None, amax_out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        triton = self.use_triton and x.is_cuda and x.numel() and not torch.compiler.is_compiling()
        if self.static:
            if scale is None:
                raise ValueError("static QuantFP8 needs the calibrated input scale")
            if triton:
                return _triton_kernels().quantize_static_triton(x, scale, self.dtype, amax_out), scale
            if amax_out is not None:
                torch.maximum(amax_out, x.abs().amax().float().reshape(amax_out.shape), out=amax_out)
            return fp8_utils.quantize_input_static(x, scale, self.dtype), scale
        if triton:
            return _triton_kernels().quantize_dynamic_triton(x, self.dtype, self.per_token)
        return fp8_utils.quantize_input_dynamic(x, self.dtype, self.per_token)


@functools.cache
def _triton_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        logger.info("triton is not installed: activation quantization uses the eager torch path")
        return False
    return True


@functools.cache
def _triton_kernels():  # the module, imported once; triton is only imported where CUDA is used
    from . import quant_triton

    return quant_triton
