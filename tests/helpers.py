"""Shared test helpers: inputs with outlier channels (as DiT activations have) and error measures."""

from __future__ import annotations

import functools

import torch


def outlier_input(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0, factor: float = 20.0) -> torch.Tensor:
    """N(0, 1) with outlier channels and outlier tokens, as DiT activations have; fresh per seed, never zero.

    One in 16 channels of the last dimension is scaled by ``factor``, token magnitudes spread log-normally, and
    one in 32 tokens is "massive" (x300), which is what makes a single per-tensor scale crush the quiet tokens.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator)
    if len(shape) > 1:
        token_gain = torch.exp(torch.randn(*shape[:-1], 1, generator=generator))
        massive = torch.rand(*shape[:-1], 1, generator=generator) < 1 / 32
        massive.view(-1)[0] = True
        x *= token_gain * torch.where(massive, 300.0, 1.0)
    channels = shape[-1]
    outliers = torch.randperm(channels, generator=generator)[: max(1, channels // 16)]
    x[..., outliers] *= factor
    return x.to(dtype)


def random_linear(in_features: int, out_features: int, bias: bool = True, seed: int = 1) -> torch.nn.Linear:
    torch.manual_seed(seed)
    layer = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        # Uneven channel magnitudes, so per-channel weight scales matter.
        layer.weight.mul_(torch.logspace(-1, 1, out_features)[:, None])
        if bias:
            layer.bias.normal_()
    return layer


def rel_err(actual: torch.Tensor, reference: torch.Tensor) -> float:
    assert torch.isfinite(actual).all(), "output has NaN/inf"
    return ((actual.double() - reference.double()).norm() / reference.double().norm()).item()


def mean_row_rel_err(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Relative error of each token (row), averaged: small tokens count as much as loud ones.

    A global norm hides per-tensor scaling's damage to quiet tokens, which normalisation layers later amplify.
    """
    assert torch.isfinite(actual).all(), "output has NaN/inf"
    diff = (actual.double() - reference.double()).reshape(-1, reference.shape[-1]).norm(dim=-1)
    return (diff / reference.double().reshape(-1, reference.shape[-1]).norm(dim=-1)).mean().item()


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
