"""QuantFP8: activation quantization, dynamic or static, per tensor or per token (or in 1x128 groups per token,
for block-scaled GEMMs).

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
from collections.abc import Callable

import torch

from . import fp8_utils
from .scheme import PER_TENSOR, PER_TOKEN, PER_TOKEN_GROUP_128, GroupShape, QuantKey

logger = logging.getLogger(__name__)

DISABLE_TRITON_ENV = "FP8_QUANT_DISABLE_TRITON"


def triton_disabled() -> bool:
    """Whether ``FP8_QUANT_DISABLE_TRITON`` asks for torch operations instead of the pack's Triton kernels."""
    return os.environ.get(DISABLE_TRITON_ENV, "") not in ("", "0")


class QuantFP8:
    """Quantize activations ``[..., K]`` to fp8.

    ``__call__(x, scale=None)`` returns ``(x_fp8, scale)`` where ``x_fp8`` has ``x``'s shape and ``scale`` is
    ``[..., 1]`` per token, ``[..., ceil(K/128)]`` per 1x128 group or ``[]`` per tensor. Static quantization needs
    ``scale``; dynamic ignores it.
    ``running`` is the static quantizer whose scale follows the activations (``auto_scales``).
    """

    def __init__(
        self,
        static: bool,
        group_shape: GroupShape,
        dtype: torch.dtype = torch.float8_e4m3fn,
        use_triton: bool | None = None,
    ) -> None:
        if group_shape not in (PER_TENSOR, PER_TOKEN, PER_TOKEN_GROUP_128):
            raise ValueError(f"QuantFP8 supports per-tensor, per-token and 1x128 groups, not {group_shape}")
        if static and group_shape != PER_TENSOR:
            raise ValueError("static activation quantization is per-tensor (one calibrated scale)")
        fp8_utils.fp8_max(dtype)  # validates the dtype
        self.static = static
        self.per_token = group_shape == PER_TOKEN
        self.group = group_shape.col if group_shape.is_per_group() else 0
        self.dtype = dtype
        # Decided once: the environment and the import are not looked at again on the hot path.
        self.use_triton = use_triton is not False and not triton_disabled() and _triton_available()

    @classmethod
    def from_key(cls, key: QuantKey, use_triton: bool | None = None) -> QuantFP8:
        return cls(key.scale.static, key.scale.group_shape, key.dtype, use_triton)

    def __call__(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.static:
            if scale is None:
                raise ValueError("static QuantFP8 needs the calibrated input scale")
            if self._triton(x):
                return _triton_kernels().quantize_static_triton(x, scale, self.dtype), scale
            return fp8_utils.quantize_input_static(x, scale, self.dtype), scale
        if self.group:
            if self._triton(x) and x.shape[-1] % self.group == 0:
                return _triton_kernels().quantize_groups_triton(x, self.dtype, self.group)
            return fp8_utils.quantize_input_groups(x, self.dtype, self.group)
        if self._triton(x):
            return _triton_kernels().quantize_dynamic_triton(x, self.dtype, self.per_token)
        return fp8_utils.quantize_input_dynamic(x, self.dtype, self.per_token)

    def running(
        self,
        x: torch.Tensor,
        history: torch.Tensor,
        spare: torch.Tensor,
        scale_out: torch.Tensor,
        overshoot: torch.Tensor,
        margin: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Static quantization with ``scale = margin * history / fp8 max``, where ``history`` (float32 ``[1]``) is the
        largest amax seen; this call's amax joins the history and, where it passes the scale's range, ``overshoot``.
        Returns ``(x_fp8, scale, history)``, the last being the buffer that now holds the history: the fused kernel
        writes it into ``spare`` (no program reads what another writes), the eager path updates ``history``."""
        if self._triton(x):
            kernels = _triton_kernels()
            x_fp8 = kernels.quantize_running_triton(x, self.dtype, history, spare, scale_out, overshoot, margin)
            return x_fp8, scale_out.reshape(()), spare
        limit = fp8_utils.fp8_max(self.dtype)
        scale = history.reshape(()).clamp(min=fp8_utils.AMAX_FLOOR) * (margin / limit)
        amax = x.detach().abs().amax().float()
        torch.maximum(overshoot, (amax / (scale * limit)).reshape(1), out=overshoot)
        torch.maximum(history, amax.reshape(1), out=history)
        return fp8_utils.quantize_input_static(x, scale, self.dtype), scale, history

    def bind(
        self,
        x_dtype: torch.dtype,
        cols: int,
        device: torch.device,
        scale: torch.Tensor | None = None,
        row_scales: bool = False,
        launcher=None,
        scratch: bool = False,
    ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
        """This quantizer for one layer's rows ``[M, cols]`` of ``x_dtype`` on ``device``, as a prepared call runs it
        (``prepared``): ``rows -> (x_fp8 [M, cols], scale)`` with the choices a call would make (Triton or eager,
        the launch's constants, a static scale's float32 copy on the device) made once. ``row_scales``: the scale
        comes back ``[M, 1]`` (what the row-wise GEMM takes) whatever the granularity, else as ``__call__`` gives
        it. ``launcher``: another launch with ``RowQuantizer``'s constructor and call shape to bind in its place
        (``fused_linear_triton``: the quantization inside the GEMM; trailing call arguments go to it); ``None``
        where this quantizer would not launch the row kernel. ``scratch``: the row kernel's outputs may come from
        shared buffers (``RowQuantizer``; only for a caller that hands them straight to its GEMM). Never inside
        ``torch.compile`` (the prepared call is not used there)."""
        static = None
        if self.static:
            if scale is None:
                raise ValueError("static QuantFP8 needs the calibrated input scale")
            static = scale.detach().to(device=device, dtype=torch.float32)
        if self.use_triton and device.type == "cuda" and (self.static or (self.per_token and not self.group)):
            mode = _triton_kernels().STATIC if self.static else _triton_kernels().DYNAMIC
            make = launcher or functools.partial(_triton_kernels().RowQuantizer, scratch=scratch)
            launch = make(mode, x_dtype, self.dtype, cols, device, row_scales=row_scales)
            if static is None:
                return _bound_rows(launch, None, None, row_scales, self)
            return _bound_rows(launch, (static.reshape(1), None, None, None), static.reshape(()), row_scales, self)
        if launcher is not None:
            return None
        return _bound_call(self, static, row_scales)

    def bind_running(
        self, x_dtype: torch.dtype, cols: int, device: torch.device, margin: float, row_scales: bool, launcher=None,
        scratch: bool = False,
    ) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]] | None:
        """``running`` bound to one layer's rows (``bind``, ``launcher`` and ``scratch`` as there): ``(rows,
        (scale_out, history, next_history, overshoot), *more) -> (x_fp8, row scales or None)``, the caller swapping
        the histories after; ``None`` where the eager path runs (``running`` itself then)."""
        if not (self.use_triton and device.type == "cuda"):
            return None
        kernels = _triton_kernels()
        make = launcher or functools.partial(kernels.RowQuantizer, scratch=scratch)
        launch = make(kernels.RUNNING, x_dtype, self.dtype, cols, device, margin, row_scales)

        def quantize(x: torch.Tensor, buffers: tuple, *more) -> tuple[torch.Tensor, torch.Tensor | None]:
            return launch(_rows_of(x), buffers, *more)

        return quantize

    def _triton(self, x: torch.Tensor) -> bool:
        return bool(self.use_triton and x.is_cuda and x.numel()) and not torch.compiler.is_compiling()


def as_row_scales(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """A per-token ``[M, 1]`` or per-tensor scale as the ``[M, 1]`` the row-wise GEMM takes (a copy where it is one
    value: the GEMM wants it contiguous)."""
    scale_a = scale if scale.dim() == 2 else scale.reshape(-1, 1)
    return scale_a if scale_a.shape[0] == rows else scale_a.expand(rows, 1).contiguous()


def _rows_of(x: torch.Tensor) -> torch.Tensor:
    """``x`` as rows with unit column stride (what the fused kernel reads)."""
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()


def _bound_rows(launch, buffers, fixed_scale, row_scales: bool, general: QuantFP8):
    """A bound fused launch: one allocation for the codes (and one for the row scales), one launch; an empty input
    takes the general path (no launch has zero programs)."""
    buffers = buffers or (None, None, None, None)

    def quantize(x: torch.Tensor, *more) -> tuple[torch.Tensor, torch.Tensor]:
        x2d = _rows_of(x)
        if not x2d.shape[0]:
            return _bound_call(general, fixed_scale, row_scales)(x)
        quantized, scales = launch(x2d, buffers, *more)
        return quantized, (scales if scales is not None else fixed_scale)

    return quantize


def _bound_call(quant: QuantFP8, static: torch.Tensor | None, row_scales: bool):
    """The general call with a static scale already on the device (the eager path: CPUs, no Triton)."""

    def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        quantized, scale = quant(x, static)
        return quantized, (as_row_scales(scale, x.shape[0]) if row_scales else scale)

    return quantize


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
