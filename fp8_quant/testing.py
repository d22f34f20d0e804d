"""What the tests and the benchmarks share: inputs shaped like a DiT's activations, layers with uneven channels,
and the error measures every comparison against a float reference uses.

In the library (not under ``tests/``) so that ``bench/`` imports it like any other module of the pack, with no
path manipulation; nothing in the pack itself imports it.
"""

from __future__ import annotations

import torch

__all__ = ["attention_inputs", "mean_row_rel_err", "outlier_input", "random_linear", "rel_err"]


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


def attention_inputs(
    b: int = 1, h: int = 4, n_q: int = 300, n_k: int = 300, d: int = 128, seed: int = 0, k_offset: float = 4.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q, k, v`` ``[B, H, N, D]`` (float32, CPU) as a trained DiT's attention sees them: K with a large positive
    offset in one channel in 16 (per head; K smoothing removes it, the softmax never sees it), V with a mean of
    0.3 sigma per channel and head (an output that is mostly that mean, so a bias in the sum over keys shows)."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n_q, d, generator=generator)
    k = torch.randn(b, h, n_k, d, generator=generator)
    channels = torch.randperm(d, generator=generator)[: d // 16]
    k[..., channels] += k_offset * torch.randn(1, h, 1, channels.numel(), generator=generator).abs()
    v = torch.randn(b, h, n_k, d, generator=generator) + 0.3 * torch.randn(1, h, 1, d, generator=generator)
    return q, k, v


def random_linear(in_features: int, out_features: int, bias: bool = True, seed: int = 1) -> torch.nn.Linear:
    """A linear whose output channels span two decades of magnitude, so that per-channel weight scales matter."""
    torch.manual_seed(seed)
    layer = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(torch.logspace(-1, 1, out_features)[:, None])
        if bias:
            layer.bias.normal_()
    return layer


def _finite(actual: torch.Tensor) -> None:
    if not bool(torch.isfinite(actual).all()):
        raise ValueError("output has NaN/inf")


def rel_err(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """``|actual - reference| / |reference|`` (Frobenius norms, in float64); a non-finite ``actual`` is an error."""
    _finite(actual)
    reference = reference.double()
    return ((actual.double() - reference).norm() / reference.norm()).item()


def mean_row_rel_err(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Relative error of each token (row), averaged: small tokens count as much as loud ones.

    A global norm hides per-tensor scaling's damage to quiet tokens, which normalisation layers later amplify.
    """
    _finite(actual)
    width = reference.shape[-1]
    diff = (actual.double() - reference.double()).reshape(-1, width).norm(dim=-1)
    return (diff / reference.double().reshape(-1, width).norm(dim=-1)).mean().item()
