"""``torch._scaled_mm`` kernels: per-tensor scales, and row-wise (per-token x per-channel) scales.

``_scaled_mm`` refuses some layers (K or N not a multiple of 16, e5m2 x e5m2, block scales); ``can_implement``
says so up front so that selection falls back instead of the forward crashing.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..fp8_utils import fp8_compute_unsupported, is_fp8_dtype, tensor_version
from ..params import Fp8LinearParams
from ..prepared import ColdLaunch, Product
from ..quant_fp8 import as_row_scales, triton_disabled
from ..scheme import MX_BLOCK, GroupShape
from .base import MX_REASON, WEIGHT_ONLY_REASON, FP8ScaledMMLinearKernel, FP8ScaledMMLinearLayerConfig
from .fast_accum import fast_accum_setting, fixed_fast_accum, use_fast_accum


def _device_support(device: torch.device, forced: bool) -> tuple[bool, str | None]:
    if not hasattr(torch, "_scaled_mm"):
        return False, "this torch has no torch._scaled_mm"
    if forced and device.type == "cpu":
        return True, None  # runs (slowly): tests and users who ask for it get it
    reason = fp8_compute_unsupported(device)
    return reason is None, reason


def _layer_support(config: FP8ScaledMMLinearLayerConfig) -> str | None:
    if config.activation_quant_key is None:
        return WEIGHT_ONLY_REASON
    weight_key = config.weight_quant_key
    if not is_fp8_dtype(weight_key.dtype):
        return f"weight dtype {weight_key.dtype} is not fp8"
    if weight_key.dtype == torch.float8_e5m2 and config.activation_quant_key.dtype == torch.float8_e5m2:
        return "e5m2 x e5m2 is not supported by _scaled_mm"
    if weight_key.group_shape == MX_BLOCK:
        return MX_REASON
    if not (weight_key.per_tensor or weight_key.group_shape.is_per_channel()):
        return f"{weight_key.group_shape.describe()} weight scales need a block-scaled kernel"
    if config.activation_quant_key.group_shape.is_per_group():
        return "1x128 activation groups need the block-scaled kernel"
    if config.in_features % 16 or config.out_features % 16:
        return f"_scaled_mm needs in/out features divisible by 16, layer is {config.out_features}x{config.in_features}"
    return None


@functools.cache
def rowwise_output_dtypes(device_type: str, index: int | None) -> tuple[torch.dtype, ...]:
    """The output dtypes this torch's row-wise ``_scaled_mm`` gives on a device, probed once on a tiny problem.

    Older torch builds output bf16 only; newer ones (cuBLASLt row-wise on Hopper, torch 2.11) also fp16 and fp32.
    An fp16 model then gets fp16 outputs straight from the GEMM, without a bf16 rounding and an extra cast.
    """
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    a = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
    ones_a, ones_b = torch.ones(16, 1, device=device), torch.ones(1, 16, device=device)
    supported = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        try:
            torch._scaled_mm(a, a.t(), scale_a=ones_a, scale_b=ones_b, out_dtype=dtype)
        except (RuntimeError, NotImplementedError, ValueError):
            continue
        supported.append(dtype)
    return tuple(supported)


@functools.cache
def cpu_rowwise_supported() -> bool:
    """Whether this torch's CPU ``_scaled_mm`` takes row-wise scales (torch 2.13 does, 2.11 asserts)."""
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


class _ScaledMMKernel(FP8ScaledMMLinearKernel):
    """What both ``_scaled_mm`` kernels share: the call, with fast accumulation where it is faster (``fast_accum``)."""

    # The default rule: fast accumulation for this kernel or not (measured per kernel, see ``fast_accum``).
    fast_accum_by_rule: bool = False
    # Whether the GEMM takes the activation scale as ``[M, 1]`` (row-wise) rather than one value.
    row_scales: bool = False

    def __init__(self, config: FP8ScaledMMLinearLayerConfig, device: torch.device) -> None:
        super().__init__(config, device)
        self.fast_accum = fast_accum_setting()

    def _scaled_mm(
        self, x: Tensor, weight: Tensor, scale_a: Tensor, scale_b: Tensor, bias: Tensor | None, out_dtype: torch.dtype
    ) -> tuple[Tensor, bool]:
        """The product, and whether ``bias`` went into it: CUDA fuses a bias only in the output dtype, and never
        with a float32 output (the base class adds it otherwise)."""
        fused = _fusable(bias, out_dtype)

        def run(fast: bool) -> Tensor:
            return torch._scaled_mm(
                x, weight.t(), scale_a=scale_a, scale_b=scale_b, bias=fused, out_dtype=out_dtype, use_fast_accum=fast
            )

        fast = use_fast_accum(
            self.fast_accum, self.name, self.fast_accum_by_rule, x, weight, out_dtype, fused is not None, run
        )
        return run(fast), fused is not None

    def gemm_dtype(self, out_dtype: torch.dtype) -> torch.dtype:
        """The dtype the GEMM itself outputs for a layer that wants ``out_dtype`` (the base class casts after)."""
        return out_dtype

    def weight_scale_operand(self, weight_scale: Tensor, out_features: int) -> Tensor:
        """The weight scale as this GEMM's ``scale_b``."""
        return weight_scale.reshape(())

    def prepare(
        self,
        weight_scale: Tensor,
        input_scale: Tensor | None,
        weight_group: GroupShape,
        activation_quantizer,
        bias: Tensor | None,
        x: Tensor,
    ) -> Product | None:
        """The whole call bound (see the base class): the quantizer with its launch, ``scale_b`` as the GEMM takes
        it, the bias in the output dtype, the fast-accumulation flag (``auto`` times per problem, so it keeps the
        general path). Per call: at most a reshape, the quantizer's launch, the GEMM, and a view back."""
        # The codes go straight into the GEMM below, so the row kernel may write them into shared buffers.
        quantize = self.bind_quantizer(input_scale, activation_quantizer, x, self.row_scales, scratch=True)
        fast = fixed_fast_accum(self.fast_accum, self.fast_accum_by_rule, x)
        if quantize is None or fast is None:
            return super().prepare(weight_scale, input_scale, weight_group, activation_quantizer, bias, x)
        out_dtype = self.output_dtype(x)
        gemm_dtype = self.gemm_dtype(out_dtype)
        if bias is not None and (bias.device != x.device or bias.dtype != out_dtype):
            bias = bias.to(x.device, out_dtype)
        fused = _fusable(bias, gemm_dtype)
        added = bias.to(gemm_dtype) if bias is not None and fused is None else None
        out_features, in_features = self.config.out_features, self.config.in_features
        scale_b = self.weight_scale_operand(weight_scale.to(x.device), out_features)
        cast = gemm_dtype != out_dtype
        one_launch = self.bind_one_launch(scale_b, bias, out_dtype, fast, input_scale, activation_quantizer, x)
        triton_gemm = self.triton_gemm(scale_b, bias, out_dtype, fast, x)
        products_per_row = out_features * in_features
        other_paths = one_launch is not None or triton_gemm is not None

        def product(x: Tensor, weight: Tensor) -> Tensor:
            rows = x if x.dim() == 2 else x.reshape(-1, in_features)
            work = rows.shape[0] * products_per_row if other_paths else 0
            if one_launch is not None and 0 < work <= one_launch_work[0] and weight.stride(1) == 1:
                try:
                    out, _ = one_launch(rows, weight)
                except ColdLaunch:  # its first launch for this input would be inside a CUDA-graph capture
                    pass
                else:
                    return out if x.dim() == 2 else out.view(*x.shape[:-1], out_features)
            x_fp8, scale_a = quantize(rows)
            if triton_gemm is not None and 0 < work <= triton_gemm_work[0] and weight.stride(1) == 1:
                try:
                    out = triton_gemm(x_fp8, scale_a, weight)
                except ColdLaunch:  # as above, or this layer's Triton GEMM failed once: ``_scaled_mm``
                    pass
                else:
                    return out if x.dim() == 2 else out.view(*x.shape[:-1], out_features)
            out = torch._scaled_mm(x_fp8, weight.t(), scale_a=scale_a, scale_b=scale_b, bias=fused,
                                   out_dtype=gemm_dtype, use_fast_accum=fast)  # fmt: skip
            if added is not None:
                out = out + added
            if cast:
                out = out.to(out_dtype)
            return out if x.dim() == 2 else out.view(*x.shape[:-1], out_features)

        return product

    def triton_gemm(self, scale_b: Tensor, bias: Tensor | None, out_dtype: torch.dtype, fast: bool, x: Tensor):
        """The Triton GEMM on codes (``codes_gemm_triton``) bound to this layer, or ``None`` where it does not apply:
        not CUDA, no Triton (or ``FP8_QUANT_DISABLE_TRITON`` set), codes and weight not both e4m3, or a GPU where its
        check failed."""
        codes = self.config.activation_quant_key
        if not x.is_cuda or triton_gemm_work[0] <= 0 or codes is None or triton_disabled():
            return None
        if not (codes.dtype == self.config.weight_quant_key.dtype == torch.float8_e4m3fn):
            return None
        try:
            from .. import codes_gemm_triton
        except ImportError:  # no Triton
            return None
        if not codes_gemm_triton.codes_gemm_works(x.device):
            return None
        return codes_gemm_triton.CodesGemm(scale_b, bias, out_dtype, self.config.out_features,
                                           self.config.in_features, self.row_scales, not fast, x.device)  # fmt: skip

    def bind_one_launch(self, scale_b: Tensor, bias: Tensor | None, out_dtype: torch.dtype, fast: bool,
                        input_scale: Tensor | None, activation_quantizer, x: Tensor):  # fmt: skip
        """The quantizer bound to the one-launch linear (``fused_linear_triton``) for calls of few rows, or ``None``
        where it does not apply: not CUDA, no Triton, e4m3 codes and weight not both, a quantizer that would not
        launch the row kernel (groups, per-tensor dynamic), or a GPU where its check failed."""
        weight_dtype, codes = self.config.weight_quant_key.dtype, self.config.activation_quant_key
        if not x.is_cuda or one_launch_work[0] <= 0 or codes is None or codes.dtype != weight_dtype:
            return None
        if weight_dtype != torch.float8_e4m3fn or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return None
        try:
            from .. import fused_linear_triton
        except ImportError:  # no Triton
            return None
        if not fused_linear_triton.fused_linear_works(x.device):
            return None
        scale = scale_b.to(torch.float32).reshape(-1).contiguous()
        if bias is not None:
            bias = bias.contiguous()
        launcher = fused_linear_triton.fused_linear(scale, bias, out_dtype, self.config.out_features, not fast)
        return self.bind_quantizer(input_scale, activation_quantizer, x, True, launcher)


# The most multiply-adds (rows x in x out features) of a call that takes the one-launch linear: past it the one
# launch's GPU time (its activation is rounded in registers, which Triton's pipeliner does not stage) outgrows the
# host time it saves (bench/NOTES.md, host cost): a 3072-wide layer takes it up to ~420 rows, a 5120-wide one up to
# ~150. In a list so that a bench can move it for a run (0: never).
one_launch_work = [4 * 10**9]
# The most multiply-adds of a call whose codes go to the Triton GEMM (``codes_gemm_triton``) rather than
# ``_scaled_mm``. Off (0) until the GPU suite and the host sweep (``bench/bench_linear_host.py --sweep``) have run
# with it on a device: timed alone it is level with cuBLAS up to ~512 rows of a 5120-wide layer for about a third
# of ``_scaled_mm``'s host cost (bench/NOTES.md), which puts its limit near 2**34 and the one launch's near 1e9.
triton_gemm_work = [0]


def _fusable(bias: Tensor | None, out_dtype: torch.dtype) -> Tensor | None:
    """The bias where ``_scaled_mm`` can add it itself: in the output dtype, and not with a float32 output."""
    return bias if bias is not None and bias.dtype == out_dtype and out_dtype != torch.float32 else None


class PerTensorScaledMMKernel(_ScaledMMKernel):
    """Per-tensor weight and activation scales: the fastest ``_scaled_mm`` form, any output dtype."""

    name = "scaled_mm_tensor"

    @classmethod
    def is_supported(cls, device: torch.device, forced: bool = False) -> tuple[bool, str | None]:
        return _device_support(device, forced)

    @classmethod
    def can_implement(cls, config: FP8ScaledMMLinearLayerConfig) -> tuple[bool, str | None]:
        reason = _layer_support(config)
        if reason:
            return False, reason
        if not config.weight_quant_key.per_tensor:
            return False, "weight scales are per-channel, not per-tensor"
        if not config.activation_quant_key.per_tensor:  # type: ignore[union-attr]
            return False, "activation scales are per-token, not per-tensor"
        return True, None

    def matmul(
        self, x: Tensor, x_scale: Tensor | None, params: Fp8LinearParams, bias: Tensor | None, out_dtype: torch.dtype
    ) -> tuple[Tensor, bool]:
        return self._scaled_mm(x, params.weight, x_scale.reshape(()), params.weight_scale.reshape(()), bias, out_dtype)


class ChannelWiseScaledMMKernel(_ScaledMMKernel):
    """Row-wise scales: ``scale_a`` [M, 1] per token and ``scale_b`` [1, N] per output channel.

    Per-tensor scales on either side are broadcast to rows, so this kernel takes every e4m3 combination. The
    output is in the model's dtype where the installed torch allows it (``rowwise_output_dtypes``), else bf16 and
    cast afterwards.
    """

    name = "scaled_mm_rowwise"
    # Faster without the fp32 promotion on every DiT shape timed (``fast_accum``), level with per-tensor then.
    fast_accum_by_rule = True
    row_scales = True

    def __init__(self, config: FP8ScaledMMLinearLayerConfig, device: torch.device) -> None:
        super().__init__(config, device)
        self.output_dtypes = rowwise_output_dtypes(device.type, device.index)
        self._weight_row_scale: tuple[Tensor, int | None, Tensor] | None = None  # (scale, version, [1, N] row)

    @classmethod
    def is_supported(cls, device: torch.device, forced: bool = False) -> tuple[bool, str | None]:
        ok, reason = _device_support(device, forced)
        if ok and device.type == "cpu" and not cpu_rowwise_supported():
            return False, f"the CPU _scaled_mm of torch {torch.__version__} takes per-tensor scales only"
        return ok, reason

    @classmethod
    def can_implement(cls, config: FP8ScaledMMLinearLayerConfig) -> tuple[bool, str | None]:
        reason = _layer_support(config)
        if reason:
            return False, reason
        if config.weight_quant_key.dtype != torch.float8_e4m3fn:
            return False, "row-wise _scaled_mm needs e4m3fn weights"
        return True, None

    def matmul(
        self, x: Tensor, x_scale: Tensor | None, params: Fp8LinearParams, bias: Tensor | None, out_dtype: torch.dtype
    ) -> tuple[Tensor, bool]:
        scale_a = as_row_scales(x_scale, x.shape[0])
        scale_b = self.weight_scale_operand(params.weight_scale, params.weight.shape[0])
        return self._scaled_mm(x, params.weight, scale_a, scale_b, bias, self.gemm_dtype(out_dtype))

    def gemm_dtype(self, out_dtype: torch.dtype) -> torch.dtype:
        return out_dtype if out_dtype in self.output_dtypes else torch.bfloat16

    def weight_scale_operand(self, weight_scale: Tensor, out_features: int) -> Tensor:
        """``[1, N]``: a per-channel scale viewed so, a per-tensor one repeated (``_per_tensor_as_rows``)."""
        if weight_scale.dim() == 1:
            return weight_scale.view(1, -1)
        return self._per_tensor_as_rows(weight_scale, out_features)

    def _per_tensor_as_rows(self, scale: Tensor, out_features: int) -> Tensor:
        """A per-tensor weight scale as the ``[1, N]`` row ``_scaled_mm`` wants, made once per scale tensor: a
        copy per call is an allocation and a kernel launch, which a host-bound layer (few tokens) pays in time.
        (A kernel serves one layer on one device; a LoRA-patched weight brings a new scale tensor.)"""
        if torch.compiler.is_compiling():  # Inductor folds the copy into the graph
            return scale.reshape(1, 1).expand(1, out_features).contiguous()
        cached, version = self._weight_row_scale, tensor_version(scale)
        if cached is not None and cached[0] is scale and cached[1] == version:
            return cached[2]
        row = scale.reshape(1, 1).expand(1, out_features).contiguous()
        if not (scale.is_cuda and torch.cuda.is_current_stream_capturing()):
            self._weight_row_scale = (scale, version, row)
        return row
