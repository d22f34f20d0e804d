"""A self-contained demo: quantize a small random transformer MLP stack and report error and bytes.

It needs no checkpoint and no GPU, so a new user can see in seconds what the package does to a model.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from .bridge import prepare_model_for_fp8
from .config import Fp8Config

logger = logging.getLogger(__name__)


class DemoBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def run_demo(width: int = 512, depth: int = 4, tokens: int = 256, device: str | None = None) -> dict[str, object]:
    """Quantize a copy of a random model with the default config; return the figures the CLI prints."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = nn.Sequential(*[DemoBlock(width) for _ in range(depth)]).to(device)
    x = torch.randn(2, tokens, width, device=device)
    x[..., :: max(1, width // 16)] *= 20  # outlier channels, as DiT activations have
    with torch.no_grad():
        reference = model(x)
        quantized = copy.deepcopy(model)
        report = prepare_model_for_fp8(quantized, Fp8Config())
        out = quantized(x)
    error = ((out - reference).norm() / reference.norm()).item()
    return {
        "device": device,
        "relative_error": error,
        "bytes_before": report.bytes_before,
        "bytes_after": report.bytes_after,
        "bf16_bytes": report.bf16_bytes,
        "summary": report.summary(),
    }
