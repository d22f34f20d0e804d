"""FP8 arithmetic helpers shared by the methods, kernels and checkpoint readers.

Scale convention everywhere: ``real ≈ fp8.to(float32) * scale`` with ``scale = amax / finfo.max``.
Values are clamped before the cast because CUDA turns an out-of-range e4m3fn cast into NaN.
"""

from __future__ import annotations

import torch

from .scheme import PER_CHANNEL, GroupShape, weight_scale_shape

FP8_DTYPES: tuple[torch.dtype, ...] = (torch.float8_e4m3fn, torch.float8_e5m2)
# The weights that can be quantized to fp8 (not e8m0 scales, not integers).
HIGH_PRECISION_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32, torch.float64)

# A floor for amax so that an all-zero row or tensor gets a tiny positive scale instead of 0 (and no 0/0).
AMAX_FLOOR = 1e-12


def is_fp8_dtype(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


_FP8_MAX = {dtype: float(torch.finfo(dtype).max) for dtype in FP8_DTYPES}


def tensor_version(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place version counter, for caches of values derived from it; ``None`` for an inference tensor
    (ComfyUI runs its nodes under ``torch.inference_mode``, where tensors keep no counter: the cache then matches on
    the tensor object alone)."""
    return None if tensor.is_inference() else tensor._version


def fp8_max(dtype: torch.dtype) -> float:
    """448 for e4m3fn, 57344 for e5m2 (a dict lookup: this sits on the forward's hot path)."""
    limit = _FP8_MAX.get(dtype)
    if limit is None:
        raise ValueError(f"{dtype} is not an fp8 dtype; expected one of {FP8_DTYPES}")
    return limit


def fp8_compute_unsupported(device: torch.device | str) -> str | None:
    """Why ``device`` has no FP8 tensor cores for ``torch._scaled_mm`` (CUDA capability 8.9+), or ``None``.

    The one capability check of the project: kernels and reports ask it. The CPU implements ``_scaled_mm``
    too, but slower than dequantize + matmul, so it counts as "no FP8 compute" for automatic choices.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return f"{device.type} has no FP8 tensor cores"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if torch.version.hip is not None:
        return "ROCm fp8 types differ (fnuz); not supported yet"
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = torch.cuda.get_device_capability(index)
    if capability < (8, 9):
        return f"GPU capability {capability[0]}.{capability[1]} has no FP8 tensor cores (needs 8.9+)"
    return None


def supports_fp8_compute(device: torch.device | str | None = None) -> bool:
    """True where FP8 tensor cores make ``torch._scaled_mm`` worth using (CUDA capability >= 8.9)."""
    return fp8_compute_unsupported(device if device is not None else _default_device()) is None


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def scale_from_amax(amax: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    return amax.float().clamp(min=AMAX_FLOOR) / fp8_max(fp8_dtype)


def cast_to_fp8(x_scaled: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """Clamp to the representable range, then cast (an unclamped CUDA cast past ±448 gives NaN)."""
    limit = fp8_max(fp8_dtype)
    return x_scaled.clamp(-limit, limit).to(fp8_dtype)


def quantize_input_dynamic(
    x: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn, per_token: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize with a scale computed from ``x`` itself.

    Returns ``(x_fp8, scale)``; ``scale`` has shape ``[..., 1]`` per token (one per row of the last
    dimension) or ``[]`` per tensor. Works on inputs of any rank ``[..., K]``.
    """
    x_float = x.float()
    if per_token:
        amax = x_float.abs().amax(dim=-1, keepdim=True)
    else:
        amax = x_float.abs().amax()
    scale = scale_from_amax(amax, fp8_dtype)
    return cast_to_fp8(x_float / scale, fp8_dtype), scale


def quantize_input_groups(
    x: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn, group: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic quantization with one scale per token and ``group`` inputs (1x128 groups: what block-scaled GEMMs
    take). Returns ``(x_fp8, scale)`` with ``scale`` of shape ``[..., ceil(K/group)]``."""
    x_float = x.float()
    k = x.shape[-1]
    padded = torch.nn.functional.pad(x_float, (0, -k % group))
    amax = padded.abs().view(*x.shape[:-1], -1, group).amax(dim=-1)
    scale = scale_from_amax(amax, fp8_dtype)
    return cast_to_fp8(x_float / expand_groups(scale, k, group), fp8_dtype), scale


def expand_groups(scale: torch.Tensor, length: int, group: int) -> torch.Tensor:
    """Group scales ``[..., ceil(K/group)]`` repeated along the last dimension to ``[..., K]``."""
    return scale.repeat_interleave(group, dim=-1)[..., :length]


def quantize_input_static(
    x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn
) -> torch.Tensor:
    """Quantize with a fixed (calibrated) scale; values beyond ``scale * max`` saturate."""
    return cast_to_fp8(x.float() / scale.float(), fp8_dtype)


def quantize_weight(
    weight: torch.Tensor,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    group: GroupShape = PER_CHANNEL,
    fit: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight ``[N, K]``; the scale has ``weight_scale_shape(group, N, K)``: ``[]``, ``[N]`` or blocks.

    ``fit``: each scale is the one of ``FIT_STEPS`` candidates between ``amax / max`` and twice that which gives
    its group the least squared error, instead of ``amax / max`` itself. e4m3's relative precision is the same
    everywhere in its range, so where a group's values are many and alike no scale does better than another; but
    where a few large values carry most of a group (a weight with a few large input columns), the scale decides
    whether those few land on the fp8 grid, and fitting it cuts the error that matters most. Per tensor there
    is nothing to fit (too many values), so ``fit`` applies to channels and blocks.

    Rows are processed in chunks so that a large weight never exists in float32 all at once.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    scale = torch.empty(weight_scale_shape(group, out_features, in_features), dtype=torch.float32, device=weight.device)
    out = torch.empty(weight.shape, dtype=fp8_dtype, device=weight.device)
    if group.is_per_tensor():
        scale.copy_(scale_from_amax(weight_row_amax(weight).amax(), fp8_dtype))
    block_rows = group.col if group.is_block() else 1  # weight rows per scale row
    for start, stop in _row_chunks(weight, block_rows):
        rows = weight[start:stop].float()
        if group.is_per_tensor():
            out[start:stop] = cast_to_fp8(rows / scale, fp8_dtype)
            continue
        chunk_scale = scale[start // block_rows : -(-stop // block_rows)]
        chunk_scale.copy_(scale_from_amax(_per_scale(rows.abs(), group, torch.amax), fp8_dtype))
        if fit:
            chunk_scale.copy_(_fitted_scale(rows, chunk_scale, group, fp8_dtype))
        out[start:stop] = cast_to_fp8(rows / _expand_rows(chunk_scale, rows.shape, group), fp8_dtype)
    return out, scale


def weight_row_amax(weight: torch.Tensor) -> torch.Tensor:
    """Each row's largest magnitude, without a weight-sized temporary (``weight.abs()`` would double a layer's memory
    on the GPU while loading). NaN and inf propagate, so the result also says whether the weight is finite."""
    return torch.linalg.vector_norm(weight, ord=float("inf"), dim=1).float()


FIT_STEPS = 16


def _fitted_scale(rows: torch.Tensor, base: torch.Tensor, group: GroupShape, fp8_dtype: torch.dtype) -> torch.Tensor:
    """Per scale entry, the candidate ``base * 2**(i / FIT_STEPS)`` with the least squared error of its group.
    Candidates only grow from ``amax / max``: a smaller scale would clip the largest value, the one that matters."""
    best, best_error = base.clone(), None
    for step in range(FIT_STEPS):
        candidate = base * 2.0 ** (step / FIT_STEPS)
        expanded = _expand_rows(candidate, rows.shape, group)
        error = (cast_to_fp8(rows / expanded, fp8_dtype).float() * expanded - rows).square()
        error = _per_scale(error, group, torch.sum)
        if best_error is None:
            best_error = error
            continue
        better = error < best_error
        best = torch.where(better, candidate, best)
        best_error = torch.minimum(error, best_error)
    return best


def _per_scale(values: torch.Tensor, group: GroupShape, reduce) -> torch.Tensor:
    """``reduce`` (``torch.amax``, ``torch.sum``) of a weight slice ``[n, K]`` over each scale's values: ``[n]`` per
    channel, ``[ceil(n/bn), ceil(K/bk)]`` per block (padded with zeros)."""
    if group.is_per_channel():
        return reduce(values, dim=1)
    block_n, block_k = group.col, group.row
    n, k = values.shape
    padded = torch.nn.functional.pad(values, (0, -k % block_k, 0, -n % block_n))
    blocks = padded.view(padded.shape[0] // block_n, block_n, padded.shape[1] // block_k, block_k)
    return reduce(blocks, dim=(1, 3))


def _expand_rows(scale: torch.Tensor, shape: torch.Size | tuple[int, int], group: GroupShape) -> torch.Tensor:
    """A slice's scale broadcastable against the slice: ``[n, 1]`` per channel, blocks repeated to ``[n, K]``."""
    return scale[:, None] if group.is_per_channel() else expand_block_scale(scale, shape, group)


def broadcast_weight_scale(scale: torch.Tensor, shape: torch.Size | tuple[int, int], group: GroupShape) -> torch.Tensor:
    """A stored weight scale of ``group`` made to broadcast against the weight ``[N, K]`` (``[]``, ``[N, 1]`` or
    the blocks repeated), for code that multiplies or divides a whole weight by its scale."""
    return scale if group.is_per_tensor() else _expand_rows(scale, shape, group)


def expand_block_scale(scale: torch.Tensor, shape: torch.Size | tuple[int, int], group: GroupShape) -> torch.Tensor:
    """A block scale ``[ceil(N/bn), ceil(K/bk)]`` repeated to the weight's ``[N, K]`` (for dequantization)."""
    n, k = shape
    return scale.repeat_interleave(group.col, dim=0)[:n].repeat_interleave(group.row, dim=1)[:, :k]


def dequantize(
    x_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32, group: GroupShape | None = None
) -> torch.Tensor:
    """Inverse of the quantizers above. ``scale``: ``[]``, ``[N]`` (per row of a weight), a block scale or
    activation groups ``[..., ceil(K/g)]`` (give its ``group``), or anything that broadcasts against ``x_fp8``
    (activation scales ``[..., 1]``). Whole blocks are scaled through a view, so no scale of the weight's size is
    made (the dequantize kernel runs this on every call)."""
    scale = scale.float()
    if group is not None and group.is_block():
        n, k = x_fp8.shape
        if n % group.col == 0 and k % group.row == 0:
            blocks = x_fp8.to(torch.float32).view(n // group.col, group.col, k // group.row, group.row)
            return (blocks * scale[:, None, :, None]).view(n, k).to(dtype)
        scale = expand_block_scale(scale, x_fp8.shape, group)
    elif group is not None and group.is_per_group():
        scale = expand_groups(scale, x_fp8.shape[-1], group.col)
    elif scale.dim() == 1 and x_fp8.dim() == 2 and scale.shape[0] == x_fp8.shape[0]:
        scale = scale[:, None]
    return (x_fp8.to(torch.float32) * scale).to(dtype)


def _row_chunks(weight: torch.Tensor, multiple: int = 1, max_elements: int = 1 << 22) -> list[tuple[int, int]]:
    """Row ranges of about ``max_elements`` each (16 MiB of float32 temporaries: loading a model stages little more
    than its fp8 bytes), starting at multiples of ``multiple`` (whole scale blocks)."""
    rows = weight.shape[0]
    step = max(1, max_elements // max(1, weight.shape[1]) // multiple) * multiple
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


# The smallest byte (sign bit clear) whose value is NaN or inf: e4m3fn has NaN at S.1111.111 only (no inf), e5m2 has
# inf and NaN wherever the exponent is 11111.
_FP8_NON_FINITE_FROM = {torch.float8_e4m3fn: 0x7F, torch.float8_e5m2: 0x7C}


def unit_weight_scale(weight: torch.Tensor) -> torch.Tensor:
    """The scale of an fp8 weight stored with none (a plain cast): its values are the weights, one scale of 1."""
    return torch.ones((), dtype=torch.float32, device=weight.device)


def count_fp8_non_finite(weight: torch.Tensor) -> int:
    """How many values of an fp8 tensor are NaN or inf, read from its bytes where the tensor is.

    Cheap where there are none, the case that matters for load time: such bytes are the largest of the tensor
    read as int8 (positive) or as uint8 (negative), so two max-reductions over views find them without a
    temporary of the weight's size; only then are they counted."""
    first_bad = _FP8_NON_FINITE_FROM.get(weight.dtype)
    if first_bad is None or weight.numel() == 0:
        return 0
    flat = weight.reshape(-1)
    signed, unsigned = flat.view(torch.int8), flat.view(torch.uint8)
    found = (signed.amax() >= first_bad) | (unsigned.amax() >= 0x80 | first_bad)
    if not bool(found):
        return 0
    return int(((unsigned & 0x7F) >= first_bad).sum())


def invalid_scale_mask(scale: torch.Tensor) -> torch.Tensor:
    """Where a scale is NaN, inf, zero or negative: values that would silently produce garbage."""
    return ~torch.isfinite(scale) | (scale <= 0)


def check_scale(scale: torch.Tensor, what: str) -> None:
    """Reject scales that would silently produce garbage: NaN, inf, zero or negative."""
    values = scale.detach().float()
    if values.numel() == 0:
        raise ValueError(f"{what}: scale is empty")
    bad = invalid_scale_mask(values)
    if bool(bad.any()):
        first = values[bad].flatten()[0].item()
        raise ValueError(f"{what}: scale must be finite and > 0, found {int(bad.sum())} bad value(s), e.g. {first}")
