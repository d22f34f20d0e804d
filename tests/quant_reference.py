"""Every launch path of the fused fp8 quantizer (``fp8_quant.quant_triton``) against an independent torch computation
of the same numbers: used on the CPU through Triton's interpreter (``test_quant_triton_interpreted.py``) and on a
GPU (``test_gpu_quant_paths.py``).

``check_all`` returns, per case, how far each output is from the reference: ``codes`` as the fraction of fp8 codes
that differ (``far``: further apart than a tie rounded the other way), the scales, histories and overshoot as their
largest relative difference, ``clamped`` as 0 where a static call's values past the range were clamped (1 where
none were: the case would not test the clamp).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fp8_quant.testing import outlier_input

LIMIT = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
FLOOR = 1e-12  # an all-zero row's amax
# (shape, input dtype): one row; rows past a program's block of 16 at an odd width; 3-D; rows longer than one block
# (the two-pass path); rows of a power-of-two width.
SHAPES = ((1, 40), (45, 320), (2, 7, 96), (3, 16400), (17, 2048))
GROUP_SHAPES = ((5, 384), (2, 3, 128), (33, 256))
Cast = Callable[[torch.Tensor, torch.dtype], torch.Tensor]


def torch_cast(scaled: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return scaled.to(dtype)


def inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int, device: str) -> torch.Tensor:
    x = (outlier_input(*shape, seed=seed) / 8).to(dtype)
    if len(shape) == 2 and shape[0] > 2:
        x[1] = 0  # an all-zero row: the floor keeps its scale positive
    return x.to(device)


def _codes(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, cast: Cast) -> torch.Tensor:
    limit = LIMIT[dtype]
    return cast((x.float() / scale).clamp(-limit, limit), dtype)


def _code_mismatch(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return 1.0
    return (actual.view(torch.uint8) != expected.view(torch.uint8)).float().mean().item()


def _far_codes(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The fraction of codes further apart than the two fp8 values next to a rounding boundary (bit patterns of
    one sign differ by 1 there): a logic error, not a tie rounded the other way."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return 1.0
    steps = (actual.view(torch.uint8).short() - expected.view(torch.uint8).short()).abs()
    return (steps > 1).float().mean().item()


def _code_measures(actual: torch.Tensor, expected: torch.Tensor) -> dict[str, float]:
    return {"codes": _code_mismatch(actual, expected), "far": _far_codes(actual, expected)}


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.shape != expected.shape:
        return float("inf")
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs() / expected.abs().clamp(min=1e-300)).max().item()


def check_all(
    quant_triton, device: str, cast: Cast = torch_cast, dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.float32)
) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for fp8 in LIMIT:
        limit = LIMIT[fp8]
        fp8_name = str(fp8).removeprefix("torch.float8_")
        for shape in SHAPES:
            for dtype in dtypes:
                x = inputs(shape, dtype, shape[0], device)
                name = f"{fp8_name} {str(dtype).removeprefix('torch.')} {'x'.join(map(str, shape))}"
                rows = x.float().abs().amax(-1, keepdim=True)
                q, s = quant_triton.quantize_dynamic_triton(x, fp8, True)
                scale = rows.clamp(min=FLOOR) / limit
                results[f"token {name}"] = {
                    "scale": _relative(s, scale),
                    **_code_measures(q, _codes(x, scale, fp8, cast)),
                }
                q, s = quant_triton.quantize_dynamic_triton(x, fp8, False)  # the largest row scale, then static
                scale = x.float().abs().amax().clamp(min=FLOOR) / limit
                results[f"tensor {name}"] = {
                    "scale": _relative(s, scale),
                    **_code_measures(q, _codes(x, scale, fp8, cast)),
                }
                given = (x.float().abs().max() / limit / 3).reshape(())  # a third of the range: values clamp
                q = quant_triton.quantize_static_triton(x, given, fp8)
                results[f"static {name}"] = {
                    **_code_measures(q, _codes(x, given, fp8, cast)),
                    "clamped": 0.0 if bool((q.float().abs() == limit).any()) else 1.0,
                }
                amax = x.float().abs().amax().reshape(1)
                for label, past in (("within", 4 * amax), ("past", amax / 3)):  # past: 1.5x the range
                    history = past.clone()
                    next_history, scale_out, overshoot = (torch.zeros(1, device=device) for _ in range(3))
                    q = quant_triton.quantize_running_triton(x, fp8, history, next_history, scale_out, overshoot, 2.0)
                    scale = history.clamp(min=FLOOR) * 2.0 / limit
                    ratio = amax / (scale * limit)
                    results[f"running {label} {name}"] = {
                        "scale": _relative(scale_out, scale),
                        **_code_measures(q, _codes(x, scale, fp8, cast)),
                        "history": _relative(next_history, torch.maximum(history, amax)),
                        "overshoot": _relative(overshoot, ratio) if bool(ratio > 1) else float(overshoot.item() != 0),
                    }
        for shape in GROUP_SHAPES:
            x = inputs(shape, dtypes[0], 7, device)
            q, s = quant_triton.quantize_groups_triton(x, fp8, 128)
            groups = x.float().reshape(*shape[:-1], shape[-1] // 128, 128)
            scale = groups.abs().amax(-1).clamp(min=FLOOR) / limit
            expected = _codes(groups, scale[..., None], fp8, cast).reshape(shape)
            results[f"groups {fp8_name} {'x'.join(map(str, shape))}"] = {
                "scale": _relative(s, scale),
                **_code_measures(q, expected),
            }
    # One scale written out per row (the row-wise GEMM's [M, 1]) by a static and a running launch.
    x = inputs((37, 200), dtypes[0], 11, device)
    given = (x.float().abs().max() / 448.0 / 3).reshape(1)
    launch = quant_triton.RowQuantizer(quant_triton.STATIC, x.dtype, torch.float8_e4m3fn, 200, torch.device(device),
                                       row_scales=True)  # fmt: skip
    q, rows = launch(x, (given, None, None, None))
    results["static row scales"] = {
        "scale": _relative(rows, given.expand(37, 1)),
        **_code_measures(q, _codes(x, given, torch.float8_e4m3fn, cast)),
    }
    history = x.float().abs().amax().reshape(1) * 2
    next_history, scale_out, overshoot = (torch.zeros(1, device=device) for _ in range(3))
    launch = quant_triton.RowQuantizer(quant_triton.RUNNING, x.dtype, torch.float8_e4m3fn, 200, torch.device(device),
                                       2.0, row_scales=True)  # fmt: skip
    q, rows = launch(x, (scale_out, history, next_history, overshoot))
    scale = history * 2.0 / 448.0
    results["running row scales"] = {
        "scale": _relative(rows, scale.expand(37, 1)) + _relative(scale_out, scale),
        **_code_measures(q, _codes(x, scale, torch.float8_e4m3fn, cast)),
        "history": _relative(next_history, history),
    }
    wide = inputs((9, 512), dtypes[0], 9, device)
    view = wide[:, 64:384]  # rows with a stride past their width go to the kernel as they are
    q, s = quant_triton.quantize_dynamic_triton(view, torch.float8_e4m3fn, True)
    scale = view.float().abs().amax(-1, keepdim=True).clamp(min=FLOOR) / 448.0
    results["token strided view"] = {
        "scale": _relative(s, scale),
        **_code_measures(q, _codes(view, scale, torch.float8_e4m3fn, cast)),
    }
    return results


def expected_cases(dtypes: int) -> int:
    """How many cases ``check_all`` runs with ``dtypes`` input dtypes."""
    per_shape = 5  # token, tensor, static, running within, running past
    return len(LIMIT) * (len(SHAPES) * dtypes * per_shape + len(GROUP_SHAPES)) + 3  # + row scales, strided view
