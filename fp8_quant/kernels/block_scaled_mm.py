"""``torch._scaled_mm`` with block scales: DeepSeek-style 128x128 weight blocks, or a weight row in groups of 128
inputs, times activations in 1x128 groups, on the FP8 tensor cores.

torch (2.9+) reads the scaling from the scale tensors' shapes and strides (cuBLASLt's block scaling, which it
enables on capability 9.0 exactly: H100/H200). The layouts it wants, for ``a [M, K]`` and ``b = W.t()``:

- activations 1x128: ``scale_a [M, ceil(K/128)]``, column-major (strides ``(1, M)``);
- weight 128x128: ``scale_b.t()`` is ``[ceil(N/128), ceil(K/128)]`` row-major with its row stride padded to a
  multiple of 4 (torch's check since the fix of its padding; before, results were wrong);
- weight groups of 128 per channel: ``scale_b.t()`` is ``[N, ceil(K/128)]`` column-major.

Whether the installed torch does this right is probed once per device on a small problem against the dequantized
product (``block_scaled_mm_problem``), so a torch that refuses or miscomputes falls back with the reason.
Per-tensor and per-token activation scales are broadcast to 1x128 groups, so every activation scheme runs here.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..fp8_utils import dequantize, fp8_compute_unsupported, quantize_input_groups, quantize_weight
from ..params import Fp8LinearParams
from ..scheme import BLOCK_128, GROUP_128, MX_BLOCK, PER_TOKEN_GROUP_128, GroupShape
from .base import MX_REASON, WEIGHT_ONLY_REASON, FP8ScaledMMLinearKernel, FP8ScaledMMLinearLayerConfig

BLOCK_WEIGHT_GROUPS: tuple[GroupShape, ...] = (BLOCK_128, GROUP_128)
BLOCK_K = 128
# torch 2.11's block-scaled _scaled_mm refuses ("Invalid scaling configuration") a K whose number of 128-blocks is
# not a multiple of 4, in every scale layout tried on an H100: K must be a multiple of 512 (DiT widths are).
K_MULTIPLE = 4 * BLOCK_K
M_MULTIPLE = 4
NEEDS = "torch 2.9+ and a GPU of capability 9.0 (H100/H200), where cuBLASLt scales 128-blocks"


def activation_block_scale(x_scale: Tensor, rows: int, k_blocks: int) -> Tensor:
    """Any activation scale (``[]``, ``[M, 1]`` or ``[M, ceil(K/128)]``) as the column-major ``[M, ceil(K/128)]``
    that block-scaled ``_scaled_mm`` reads."""
    scale = x_scale.float().reshape(-1, 1) if x_scale.dim() < 2 else x_scale.float()
    return scale.expand(rows, k_blocks).t().contiguous().t()


def weight_block_scale(weight_scale: Tensor, group: GroupShape) -> Tensor:
    """A stored block scale (``[ceil(N/128), ceil(K/128)]`` or ``[N, ceil(K/128)]``) as ``scale_b`` for
    ``b = W.t()`` (see the module docstring for the layouts)."""
    scale = weight_scale.float()
    if group == GROUP_128:
        return scale.t().contiguous()
    n_blocks, k_blocks = scale.shape
    padded = torch.zeros(n_blocks, -(-k_blocks // 4) * 4, dtype=torch.float32, device=scale.device)
    padded[:, :k_blocks] = scale
    return padded[:, :k_blocks].t()


def block_scaled_mm(
    x: Tensor, x_scale: Tensor, weight: Tensor, weight_scale: Tensor, group: GroupShape, out_dtype: torch.dtype
) -> Tensor:
    """``x [M, K]`` (fp8) times ``weight [N, K]`` (fp8) with block scales, as ``_scaled_mm`` takes them.

    torch 2.11 on an H100 refuses an M that is not a multiple of 4 (seen for M = 3 and 77): such inputs get zero
    rows (unit scales) appended and the product is cropped, a small copy for the small M it happens to."""
    k_blocks = -(-x.shape[1] // BLOCK_K)
    rows = x.shape[0]
    x_scale = activation_block_scale(x_scale, rows, k_blocks)
    pad = -rows % M_MULTIPLE
    if pad:
        x = torch.cat([x, torch.zeros(pad, x.shape[1], dtype=x.dtype, device=x.device)])
        padded_scale = torch.ones(rows + pad, k_blocks, dtype=x_scale.dtype, device=x.device)
        padded_scale[:rows] = x_scale
        x_scale = padded_scale.t().contiguous().t()
    out = torch._scaled_mm(
        x, weight.t(), scale_a=x_scale, scale_b=weight_block_scale(weight_scale, group), out_dtype=out_dtype
    )
    return out[:rows] if pad else out


def block_scaled_mm_problem(device: torch.device, group: GroupShape) -> tuple[Tensor, ...]:
    """A small problem of the K the kernel takes (a multiple of 512), with uneven scales:
    ``(x_fp8, x_scale [M, K/128], w_fp8, w_scale, reference)``; the reference is the dequantized product."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, K_MULTIPLE, generator=generator) * torch.logspace(-2, 1, K_MULTIPLE)
    w = torch.randn(256, K_MULTIPLE, generator=generator) * torch.logspace(-2, 1, 256)[:, None]
    x_fp8, x_scale = quantize_input_groups(x, group=BLOCK_K)
    w_fp8, w_scale = quantize_weight(w, group=group)
    reference = dequantize(x_fp8, x_scale, group=PER_TOKEN_GROUP_128) @ dequantize(w_fp8, w_scale, group=group).t()
    return tuple(t.to(device) for t in (x_fp8, x_scale, w_fp8, w_scale, reference))


@functools.cache
def block_scaled_mm_failure(device_type: str, index: int | None) -> str | None:
    """Why this torch's block-scaled ``_scaled_mm`` cannot serve this device (refused, or a wrong product), or
    ``None``; probed once per device on ``block_scaled_mm_problem`` for both weight layouts."""
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    for group in BLOCK_WEIGHT_GROUPS:
        x, x_scale, w, w_scale, reference = block_scaled_mm_problem(device, group)
        try:
            out = block_scaled_mm(x, x_scale, w, w_scale, group, torch.float32)
        except (RuntimeError, NotImplementedError, ValueError, TypeError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            return f"this torch {torch.__version__} refuses block-scaled _scaled_mm ({first_line[:120]})"
        error = ((out.float() - reference).norm() / reference.norm()).item()
        if not error < 1e-3:
            return f"this torch {torch.__version__} computes block-scaled _scaled_mm wrongly (error {error:.2g})"
    return None


def block_scaled_device_support(device: torch.device) -> tuple[bool, str | None]:
    """Whether block-scaled ``_scaled_mm`` runs on ``device``, with the reason and what it needs when not."""
    if not hasattr(torch, "_scaled_mm"):
        return False, f"this torch has no torch._scaled_mm (block scales need {NEEDS})"
    reason = fp8_compute_unsupported(device)
    if reason is not None:
        return False, reason
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = torch.cuda.get_device_capability(index)
    if capability != (9, 0):
        return False, f"GPU capability {capability[0]}.{capability[1]}: block-scaled _scaled_mm needs {NEEDS}"
    failure = block_scaled_mm_failure(device.type, index)
    if failure is not None:
        return False, f"{failure}; block scales need {NEEDS}"
    return True, None


class BlockScaledMMKernel(FP8ScaledMMLinearKernel):
    """128x128 weight blocks or groups of 128 per channel, activations in 1x128 groups (or broadcast to them)."""

    name = "scaled_mm_block"

    @classmethod
    def is_supported(cls, device: torch.device, forced: bool = False) -> tuple[bool, str | None]:
        return block_scaled_device_support(device)

    @classmethod
    def can_implement(cls, config: FP8ScaledMMLinearLayerConfig) -> tuple[bool, str | None]:
        weight_key, activation_key = config.weight_quant_key, config.activation_quant_key
        if activation_key is None:
            return False, WEIGHT_ONLY_REASON
        if weight_key.group_shape == MX_BLOCK:
            return False, MX_REASON
        if weight_key.group_shape not in BLOCK_WEIGHT_GROUPS:
            return False, f"{weight_key.group_shape.describe()} weight scales are not 128-block scales"
        if weight_key.dtype != torch.float8_e4m3fn or activation_key.dtype != torch.float8_e4m3fn:
            return False, "block-scaled _scaled_mm needs e4m3fn weights and activations"
        if config.in_features % K_MULTIPLE or config.out_features % 16:
            return False, (
                f"block-scaled _scaled_mm needs in features divisible by {K_MULTIPLE} and out features by 16, "
                f"layer is {config.out_features}x{config.in_features}"
            )
        return True, None

    def matmul(
        self, x: Tensor, x_scale: Tensor | None, params: Fp8LinearParams, bias: Tensor | None, out_dtype: torch.dtype
    ) -> tuple[Tensor, bool]:
        out = block_scaled_mm(x, x_scale, params.weight, params.weight_scale, params.weight_group, out_dtype)
        return out, False
