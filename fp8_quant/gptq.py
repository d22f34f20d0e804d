"""Error-compensating rounding of a weight to fp8 or int8 (GPTQ, Frantar et al. 2022), with the layer's per-channel
or per-tensor scales.

Why: rounding each weight to its nearest fp8 value ignores how the errors of a row add up on the inputs the layer
actually sees. GPTQ rounds one input column at a time and moves the rounding error onto the columns not yet
rounded, weighted by the inverse of the inputs' Hessian ``H = X^T X``, so that ``X W^T`` (not ``W``) is kept close.
For fp8 the grid is e4m3 values times the row's scale; the scale stays ``amax / 448`` of the original weight. For
int8 (``torch.int8``) it is the integers in [-127, 127] times ``amax / 127``, rounded half to even (``quant_int8``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from .fp8_utils import cast_to_fp8, fp8_max, scale_from_amax
from .quant_int8 import INT8_MAX, int8_scale, round_to_int8
from .scheme import GroupShape

logger = logging.getLogger(__name__)


def supports(group: GroupShape) -> bool:
    """Whether error-compensating rounding can keep ``group``'s scales: one per output channel or per tensor (a
    column's rounding error moves along its row, so each row needs one scale for all its inputs)."""
    return group.is_per_channel() or group.is_per_tensor()


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    fp8_dtype: torch.dtype,
    group: GroupShape,
    damp: float = 0.01,
    block: int = 128,
    name: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fp8 or int8 weight [N, K], scale)`` for ``weight`` [N, K], ``hessian`` [K, K] of the layer's inputs;
    ``fp8_dtype``: the grid (an fp8 dtype, or ``torch.int8``).

    ``group``: per channel (scale ``[N]``) or per tensor (scale ``[]``). ``damp``: the fraction of the mean
    diagonal added to ``H`` (numerical stability, as in the paper). Columns are processed in decreasing order of
    their input energy ("act order"). Where ``H`` cannot be factorised, plain rounding is used and logged.
    """
    if not supports(group):
        raise ValueError(f"{name}: error-compensating rounding supports per-channel or per-tensor scales only")
    w = weight.detach().float().clone()
    scale_of = int8_scale if fp8_dtype == torch.int8 else lambda amax: scale_from_amax(amax, fp8_dtype)
    if group.is_per_tensor():
        scale = scale_of(w.abs().amax())
        rows = scale.expand(w.shape[0])
    else:
        scale = scale_of(w.abs().amax(dim=1))
        rows = scale
    inverse = _inverse_cholesky(hessian.to(w.device, torch.float32), damp, name)
    if inverse is None:
        if fp8_dtype == torch.int8:
            return round_to_int8(w, rows[:, None]), scale
        return cast_to_fp8(w / rows[:, None], fp8_dtype), scale
    order, hinv = inverse
    with _one_thread_on_cpu(w.device):
        codes = _round_columns(w[:, order].t().contiguous(), hinv, rows, fp8_dtype, block)
    restored = torch.empty(codes.shape[::-1], dtype=fp8_dtype, device=codes.device)
    restored[:, order] = codes.t()
    return restored, scale


def _round_columns(
    w: torch.Tensor, hinv: torch.Tensor, rows: torch.Tensor, fp8_dtype: torch.dtype, block: int
) -> torch.Tensor:
    """The GPTQ loop on ``w`` given as columns ([K, N], contiguous: each step reads and updates whole rows);
    ``hinv``: upper Cholesky factor of H^-1; ``rows``: the output channels' scales. Returns the codes [K, N]."""
    codes = torch.empty_like(w, dtype=fp8_dtype)
    integer = fp8_dtype == torch.int8
    limit = INT8_MAX if integer else fp8_max(fp8_dtype)
    inverse_rows = 1.0 / rows
    k = w.shape[0]
    for start in range(0, k, block):
        stop = min(start + block, k)
        chunk = w[start:stop]
        errors = torch.empty_like(chunk)
        local = hinv[start:stop, start:stop]
        pivots = local.diagonal().tolist()
        for i in range(stop - start):
            # One column: its fp8 codes, then its rounding error spread over the columns not yet rounded (a rank-1
            # update). Few, in-place operations: this loop runs once per input feature.
            code = codes[start + i]
            scaled = chunk[i] * inverse_rows
            code.copy_((scaled.round_() if integer else scaled).clamp_(-limit, limit))
            error = torch.addcmul(chunk[i], code.float(), rows, value=-1, out=errors[i]).div_(pivots[i])
            if i + 1 < stop - start:
                chunk[i + 1 :].addr_(local[i, i + 1 :], error, alpha=-1)
        if stop < k:
            w[stop:].sub_(hinv[start:stop, stop:].t() @ errors)
    return codes


@contextlib.contextmanager
def _one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """The loop is thousands of small operations: on a CPU, threads cost more than they give (bench/NOTES.md)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _inverse_cholesky(hessian: torch.Tensor, damp: float, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(column order, upper Cholesky factor of H^-1 in that order)``, or ``None`` where H is not usable."""
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError(f"{name}: the layer's inputs hold NaN or inf on the sample inputs")
    h = hessian.clone()
    diagonal = h.diagonal()
    dead = diagonal == 0
    diagonal[dead] = 1.0  # inputs that are always zero: plain rounding, no error moved onto them
    order = torch.argsort(diagonal, descending=True)
    h = h[order][:, order]
    for attempt in range(4):
        eye = torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
        damped = h + eye * (damp * 10**attempt) * h.diagonal().mean()
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return order, upper
    logger.info("%s: input Hessian not positive definite; plain rounding", name)
    return None
