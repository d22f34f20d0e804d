"""Test helpers: the inputs and error measures shared with bench/ (``fp8_quant.testing``, re-exported here for the
tests' ``from helpers import ...``) and a Hadamard matrix built entry by entry."""

from __future__ import annotations

import functools

import torch

from fp8_quant.testing import mean_row_rel_err, outlier_input, random_linear, rel_err

__all__ = ["explicit_hadamard", "mean_row_rel_err", "outlier_input", "random_linear", "rel_err"]


H4 = [[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]]


@functools.cache
def explicit_hadamard(size: int) -> torch.Tensor:
    """The normalised Kronecker power of H4, entry by entry from the base-4 digits of the indices (no kron)."""
    digits = 0
    while 4**digits < size:
        digits += 1
    matrix = torch.empty(size, size, dtype=torch.float64)
    for i in range(size):
        for j in range(size):
            value = 1
            for d in range(digits):
                value *= H4[(i // 4**d) % 4][(j // 4**d) % 4]
            matrix[i, j] = value
    return matrix / size**0.5


def run_interpreted(script: str, repo: str) -> dict:
    """``script`` in a fresh Python under Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is
    imported), with ``REPO`` defined; the JSON of its last ``RESULT `` line."""
    import json
    import os
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", f"REPO = {repo!r}\n" + script],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, TRITON_INTERPRET="1"),
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def grouped_int8_operands(group: int, rows: int, inner: int, cols: int, generator: torch.Generator):
    """Random int8 ``a [M, K]`` and ``w [N, K]`` with group scales over three decades (so a group scaled by the
    wrong one shows): row scales group-major ``[K / g, M]``, column scales ``[N, K / g]``."""
    a = torch.randint(-127, 128, (rows, inner), dtype=torch.int8, generator=generator)
    w = torch.randint(-127, 128, (cols, inner), dtype=torch.int8, generator=generator)
    groups = inner // group
    row = 10 ** (-3 * torch.rand(groups, rows, generator=generator))
    column = 10 ** (-3 * torch.rand(cols, groups, generator=generator))
    return a, w, row, column


def grouped_int8_reference(a, w, row, column, bias, group: int) -> torch.Tensor:
    """The group-scaled int8 product read independently: each group's exact dot times its own two scales, summed
    in float64, plus the bias."""
    expected = bias.double().expand(a.shape[0], w.shape[0]).clone()
    for g in range(a.shape[1] // group):
        part = slice(g * group, (g + 1) * group)
        dot = a[:, part].double() @ w[:, part].double().t()
        expected += dot * row[g].double()[:, None] * column[:, g].double()[None, :]
    return expected


def gpu_layer_pair(config, dtype: torch.dtype, bias: bool):
    """A float32 reference linear (512 -> 384, output channels over two decades) and two independent 8-bit copies
    of it on the GPU in ``dtype`` under ``config``: one for the path under test, one for the path it is checked
    against (the GPU tests of the prepared product's paths)."""
    from torch import nn

    from fp8_quant import clone_module_tree, prepare_model_for_fp8

    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(512, 384, bias=bias))
    with torch.no_grad():
        reference[0].weight.mul_(torch.logspace(-1, 1, 384).unsqueeze(1))
    model = clone_module_tree(reference).to("cuda", dtype)
    prepare_model_for_fp8(model, config, quantize_device="cuda")
    return reference, model, clone_module_tree(model)
