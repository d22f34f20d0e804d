"""The text-encoder recipes' fitted result on disk, so that a restart or a second graph does not fit the same
encoder again.

Why: fitting the quality recipe runs the encoder a few hundred times (minutes on a CPU, a couple on a GPU for a
T5-XXL), and ComfyUI forgets a node's output at every restart or cache eviction. The fit depends only on the
encoder's tensors, the sample inputs and the recipe's settings, so it is stored under a key made of all three:
the rounded fp8 weights with their scales and the per-layer sensitivity table, in one safetensors file (about the
size of the fp8 encoder). The most recently used ``MAX_ENTRIES`` files are kept; a file that cannot be read or
does not fit the model is ignored (with a log line) and the fit is done again, and a file that cannot be written
only costs the next run its time.

The key reads every tensor once (a float64 sum and a few thousand values spread over it): a changed fine-tune, a
merged LoRA or another checkpoint gives another key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .formats.errors import CheckpointError
from .formats.header import read_header
from .formats.safe_io import MAX_QUANT_METADATA_BYTES, loads_bounded, open_tensors
from .formats.streaming import PlannedTensor, write_streaming
from .sensitivity import LayerSensitivity, SensitivityReport

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when what a fit produces changes for the same inputs
MAX_ENTRIES = 3
SAMPLED_VALUES = 4096  # values of each tensor read into the key besides its sum
METADATA_KEY = "fp8_quant_fit"
_NAME = re.compile(r"fit-[0-9a-f]{32}\.safetensors")

RoundedWeights = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class FittedResult:
    """What a fit produces: each rounded layer's fp8 weight and scale, the sensitivity table (with the layers kept
    in high precision marked), and the output error it reached on ``samples`` sample inputs."""

    rounded: RoundedWeights
    sensitivity: SensitivityReport
    error: float
    samples: int


class FitCache:
    """Fitted results in ``directory``, one file per key."""

    def __init__(self, directory: str | os.PathLike, max_entries: int | None = None) -> None:
        self.directory = Path(directory)
        self.max_entries = MAX_ENTRIES if max_entries is None else max_entries

    def path(self, key: str) -> Path:
        return self.directory / f"fit-{key[:32]}.safetensors"

    def load(self, key: str, layers: Mapping[str, nn.Module]) -> FittedResult | None:
        """The result stored under ``key`` for ``layers`` (name -> linear), or ``None`` (nothing stored, or a file
        that cannot be used: logged)."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            result = _read(path, key, layers)
        except (CheckpointError, OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("fp8 text encoder: stored fit %s is not usable (%s); fitting again", path, error)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # most recently used
        return result

    def store(self, key: str, result: FittedResult) -> Path | None:
        """Write ``result`` under ``key`` (atomically) and drop the least recently used files beyond
        ``max_entries``; ``None`` where it could not be written (logged: the fit itself is not affected)."""
        path = self.path(key)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            _write(path, key, result)
        except (CheckpointError, OSError, RuntimeError) as error:
            logger.warning("fp8 text encoder: could not keep the fit in %s (%s)", path, error)
            return None
        self._prune(keep=path)
        return path

    def _prune(self, keep: Path) -> None:
        with contextlib.suppress(OSError):
            entries = [entry for entry in self.directory.iterdir() if _NAME.fullmatch(entry.name)]
            entries.sort(key=lambda entry: (entry == keep, entry.stat().st_mtime), reverse=True)
            for entry in entries[self.max_entries :]:
                entry.unlink()
                logger.info("fp8 text encoder: dropped the least recently used stored fit %s", entry)


def fit_key(
    model: nn.Module,
    samples: Sequence[Mapping[str, Any]],
    settings: Mapping[str, Any],
) -> str:
    """A digest of everything a fit depends on: the model's class and tensors, the sample inputs, the settings."""
    digest = hashlib.sha256()
    digest.update(f"{CACHE_FORMAT}|{type(model).__module__}.{type(model).__qualname__}|".encode())
    digest.update(json.dumps({k: repr(v) for k, v in sorted(settings.items())}).encode())
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in tensors:
        digest.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(_tensor_digest(tensor))
    for sample in samples:
        digest.update(b"|sample|")
        digest.update(_value_digest(sample).encode())
    return digest.hexdigest()


def _tensor_digest(tensor: torch.Tensor) -> bytes:
    if tensor.is_meta or tensor.numel() == 0:
        return b"-"
    with torch.no_grad():
        flat = tensor.detach().reshape(-1)
        if flat.is_floating_point() and flat.element_size() > 1:
            total = repr(float(torch.sum(flat, dtype=torch.float64))).encode()
        else:  # fp8, integers, booleans: their bytes
            total = repr(int(flat.contiguous().view(torch.uint8).sum(dtype=torch.int64))).encode()
        count = min(SAMPLED_VALUES, flat.numel())
        # Integer steps: a float linspace rounds the last position past the end of a tensor of 2^24+ values.
        positions = torch.arange(count, device=flat.device, dtype=torch.int64) * (flat.numel() - 1) // max(1, count - 1)
        values = flat[positions].contiguous().view(torch.uint8).cpu().numpy().tobytes()
    return total + b":" + hashlib.sha256(values).digest()


def _value_digest(value: Any) -> str:
    """A stable text for a sample input: tensors by dtype, shape and content digest, containers item by item."""
    if isinstance(value, torch.Tensor):
        return f"T({value.dtype},{tuple(value.shape)},{_tensor_digest(value).hex()})"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k!r}:{_value_digest(v)}" for k, v in sorted(value.items(), key=lambda i: repr(i[0])))
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_value_digest(v) for v in value) + "]"
    return repr(value)


def _write(path: Path, key: str, result: FittedResult) -> None:
    plan = []
    for name, (weight, scale) in result.rounded.items():
        for suffix, tensor in (("weight", weight), ("weight_scale", scale)):
            plan.append(PlannedTensor(f"{name}.{suffix}", tensor.dtype, tuple(tensor.shape), _on_cpu(tensor)))
    info = {
        "format": CACHE_FORMAT,
        "key": key,
        "layers": list(result.rounded),
        "sensitivity": [[s.name, s.error, s.numel, s.fp8_bytes, s.kept] for s in result.sensitivity.layers],
        "budget": result.sensitivity.budget,
        "error": result.error,
        "samples": result.samples,
    }
    write_streaming(path, plan, {METADATA_KEY: json.dumps(info)}, None)


def _on_cpu(tensor: torch.Tensor):
    return lambda: tensor.detach().to("cpu").contiguous()


def _read(path: Path, key: str, layers: Mapping[str, nn.Module]) -> FittedResult:
    header = read_header(path)
    raw = (header.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError("not a stored fit")
    info = loads_bounded(raw, f"{path}: {METADATA_KEY}", MAX_QUANT_METADATA_BYTES)
    if not isinstance(info, dict) or info.get("format") != CACHE_FORMAT or info.get("key") != key:
        raise ValueError("written for another model, sample set or version")
    names = info["layers"]
    unknown = [name for name in names if name not in layers]
    if unknown:
        raise ValueError(f"layer {unknown[0]!r} is not in this model")
    rounded: RoundedWeights = {}
    with open_tensors(path) as handle:
        for name in names:
            weight = layers[name].weight
            fp8_weight = handle.get_tensor(f"{name}.weight")
            scale = handle.get_tensor(f"{name}.weight_scale")
            if tuple(fp8_weight.shape) != tuple(weight.shape) or fp8_weight.element_size() != 1:
                raise ValueError(f"{name}: stored weight {fp8_weight.dtype}{tuple(fp8_weight.shape)} does not fit")
            if scale.numel() not in (1, weight.shape[0]) or not bool(torch.isfinite(scale).all()):
                raise ValueError(f"{name}: stored scale does not fit")
            rounded[name] = (fp8_weight.to(weight.device), scale.to(weight.device))
    table = _sensitivity(info["sensitivity"], float(info["budget"]), set(names))
    return FittedResult(rounded, table, float(info["error"]), int(info["samples"]))


def _sensitivity(rows: Iterable, budget: float, names: set[str]) -> SensitivityReport:
    layers = []
    for name, error, numel, fp8_bytes, kept in rows:
        if name not in names:
            raise ValueError(f"sensitivity row {name!r} has no stored weight")
        layers.append(LayerSensitivity(str(name), float(error), int(numel), int(fp8_bytes), bool(kept)))
    return SensitivityReport(layers, budget)
