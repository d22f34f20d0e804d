"""Which attention runs a DiT's softmax attention, and running it: the fastest 16-bit SDPA backend torch has on this
GPU (chosen by timing the candidates once per problem), the pack's 8-bit kernel (``lowbit_attention``) where asked
for, or the caller's own attention (ComfyUI's) for anything these do not cover.

Why by measurement: on some GPUs torch's cuDNN backend runs DiT shapes much faster than FlashAttention-2, which
ComfyUI lists first, while on other GPUs and torch versions the order differs; the numbers are in the bench notes.
The 8-bit kernel is not an automatic choice: where it is faster than cuDNN (long videos) it rounds P and V in e4m3,
10-100 times the error of 16-bit attention by the inputs (``bench/NOTES.md``).

Everything here is ComfyUI-free: ``AttentionDispatcher.attend`` takes ``[B, H, N, D]`` tensors and returns
``None`` where the caller's own attention must run, with the reason logged once.
"""

from __future__ import annotations

import enum
import logging
import os
import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import lowbit_attention

logger = logging.getLogger(__name__)


class AttentionChoice(str, enum.Enum):
    """What a person asks for (the ``attention`` option)."""

    AUTO = "auto"  # the fastest 16-bit backend, measured
    FASTEST_16BIT = "fastest-16bit"  # the same, said explicitly
    LOWBIT = "8bit"  # the pack's 8-bit kernel where it can run, else the fastest 16-bit one
    COMFY = "comfy"  # the attention ComfyUI chose, untouched


ATTENTION_CHOICES: tuple[str, ...] = tuple(choice.value for choice in AttentionChoice)
ATTENTION_ENV = "FP8_QUANT_ATTENTION"  # forces one backend: a name of SDPA_BACKENDS, "8bit" or "comfy"
SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}
DEFAULT_ORDER = ("cudnn", "flash", "efficient")  # used where nothing may be timed (compiling, graph capture)
MIN_GAIN = 0.05  # a backend must be this much faster than the first of DEFAULT_ORDER to displace it
LOWBIT = "8bit"
COMFY = "comfy"
MAX_PROBLEMS = 64  # remembered choices (shapes in use at once)


def parse_attention(value: str | AttentionChoice, option: str = "attention") -> AttentionChoice:
    if isinstance(value, AttentionChoice):
        return value
    try:
        return AttentionChoice(value)
    except ValueError:
        raise ValueError(f"{option}: {value!r} is not allowed; allowed values: {list(ATTENTION_CHOICES)}") from None


def forced_backend() -> str | None:
    """The backend ``FP8_QUANT_ATTENTION`` forces, checked once per call site (a bad value is a one-line error)."""
    value = os.environ.get(ATTENTION_ENV) or None
    allowed = (*SDPA_BACKENDS, LOWBIT, COMFY)
    if value is not None and value not in allowed:
        raise ValueError(f"{ATTENTION_ENV}: {value!r} is not allowed; allowed values: {list(allowed)}")
    return value


@dataclass(frozen=True)
class Problem:
    """What decides a backend's speed: the GPU, dtype, shape."""

    device: torch.device
    dtype: torch.dtype
    batch: int
    heads: int
    n_q: int
    n_k: int
    head_dim: int

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor) -> Problem:
        b, h, n_q, d = q.shape
        return cls(q.device, q.dtype, b, h, n_q, k.shape[2], d)


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, extra: dict) -> str | None:
    """Why none of the pack's backends takes this call (the caller's attention runs), or ``None``."""
    if mask is not None:
        return "an attention mask: ComfyUI's attention"
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"{q.dtype}: ComfyUI's attention"
    if q.dim() != 4 or k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3] or v.shape[3] != q.shape[3]:
        return "grouped or mismatched heads: ComfyUI's attention"
    if q.shape[3] % 8 or q.shape[3] > 256:
        return f"head dim {q.shape[3]}: ComfyUI's attention"
    if extra.get("scale") is not None or extra.get("enable_gqa"):
        return "a custom softmax scale or grouped-query attention: ComfyUI's attention"
    if q.device.type != "cuda":
        return f"{q.device.type}: ComfyUI's attention"
    return None


def _sdpa(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    with sdpa_kernel([SDPA_BACKENDS[backend]]):
        return F.scaled_dot_product_attention(q, k, v)


def _lowbit_reason(q: torch.Tensor) -> str | None:
    """Why the 8-bit kernel cannot run this call, or ``None``."""
    if lowbit_attention.triton is None:
        return "no Triton"
    if torch.cuda.get_device_capability(q.device) < (8, 9):
        return "this GPU has no FP8 tensor cores (capability 8.9+)"
    if not lowbit_attention.head_dim_supported(q.shape[3]):
        return f"head dim {q.shape[3]} (the 8-bit kernel takes 64 or 128)"
    return None


class AttentionDispatcher:
    """One per patched model: the user's choice, the measured backend per problem, the reasons said once."""

    def __init__(self, choice: AttentionChoice | str, timer=None) -> None:
        self.choice = parse_attention(choice)
        self.forced = forced_backend()
        self.timer = timer or _time_backend
        self.chosen: dict[Problem, str] = {}
        self.used: dict[str, str] = {}  # backend -> why, for the summary
        self._logged: set[str] = set()

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None, low_precision: bool = True, **extra
    ) -> torch.Tensor | None:
        """Attention of [B, H, N, D] tensors by the chosen backend, or ``None`` where the caller's must run."""
        if self.forced == COMFY or (self.forced is None and self.choice is AttentionChoice.COMFY):
            return None
        reason = unsupported(q, k, v, mask, extra)
        if reason is not None:
            self._note(COMFY, reason)
            return None
        wants_lowbit = self.forced == LOWBIT or (self.forced is None and self.choice is AttentionChoice.LOWBIT)
        if wants_lowbit:
            why_not = _lowbit_reason(q) or (None if low_precision else "this step or layer asks for 16-bit attention")
            if why_not is None:
                self._note(LOWBIT, "asked for")
                return lowbit_attention.lowbit_attention(q, k, v)
            self._note("16-bit", f"8-bit not used: {why_not}")
        backend = self.forced if self.forced in SDPA_BACKENDS else self._fastest(q, k, v)
        return _sdpa(backend, q, k, v)

    def _fastest(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
        problem = Problem.of(q, k)
        backend = self.chosen.get(problem)
        if backend is not None:
            return backend
        if not may_time(q.device):
            return DEFAULT_ORDER[0]  # nothing is timed inside a trace or a graph; the first eager call measures
        times = {}
        for name in DEFAULT_ORDER:
            try:
                times[name] = self.timer(name, q, k, v)
            except RuntimeError:  # this backend cannot run this problem on this GPU
                continue
        if not times:
            backend, why = "efficient", "no backend could be timed"
        else:
            default = next(name for name in DEFAULT_ORDER if name in times)
            fastest = min(times, key=times.get)
            backend = fastest if times[fastest] < (1 - MIN_GAIN) * times[default] else default
            why = ", ".join(f"{name} {ms:.3f} ms" for name, ms in times.items())
        if len(self.chosen) >= MAX_PROBLEMS:
            self.chosen.clear()
        self.chosen[problem] = backend
        self._note(backend, f"fastest measured ({why})")
        return backend

    def _note(self, backend: str, why: str) -> None:
        self.used.setdefault(backend, why)
        message = f"attention: {backend} ({why})"
        if message not in self._logged and not torch.compiler.is_compiling():
            self._logged.add(message)
            logger.info(message)

    def describe(self) -> str:
        """What was asked for, and what ran so far."""
        if self.forced is not None:
            asked = f"{self.forced} (forced by {ATTENTION_ENV})"
        else:
            asked = self.choice.value
        ran = "; ".join(f"{name}: {why}" for name, why in self.used.items()) or "not run yet"
        return f"attention {asked}: {ran}"


def may_time(device: torch.device) -> bool:
    """Whether backends may be timed here: not inside torch.compile's trace (asked first: dynamo cannot trace
    ``is_current_stream_capturing``, and asking it there breaks the graph at every attention call), nor while a
    CUDA graph is being captured."""
    if torch.compiler.is_compiling():
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _time_backend(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, reps: int = 3) -> float:
    """Median ms of ``reps`` calls of one SDPA backend after a warm-up call (CUDA events, on q's device)."""
    _sdpa(name, q, k, v)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _sdpa(name, q, k, v)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def in_guarded_step(sigma, sample_sigmas, steps: int) -> bool:
    """Whether the current sigma is among the first or last ``steps`` of the sampling run (by sigma), where
    low-precision attention's artifacts show most; ``False`` where the run's sigmas are not known."""
    if steps <= 0 or sigma is None or sample_sigmas is None:
        return False
    sigmas = [float(s) for s in sample_sigmas.flatten().tolist() if float(s) > 0]
    if not sigmas:
        return False
    current = float(sigma.flatten()[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
    ordered = sorted(sigmas, reverse=True)
    guarded = set(ordered[:steps]) | set(ordered[-steps:])
    return any(abs(current - s) <= 1e-6 * max(1.0, abs(s)) for s in guarded)
