"""Run a model on sample inputs: its reference outputs, and what its linears see (X^T X per layer).

Why: a text encoder's quality recipe is fitted to the encoder itself. The sensitivity pass compares each candidate
against the high-precision outputs on the same samples, and error-compensating rounding (``gptq``) needs each
layer's input statistics ``H = X^T X``. A sample is a dict of keyword arguments; ``forward(model, **sample)``
runs one (``model(**sample)`` unless the caller says otherwise, e.g. ComfyUI's ``encode_token_weights``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

Sample = Mapping[str, Any]
Forward = Callable[..., Any]
# Hessians of a group of layers held at once: bounds memory on big encoders (T5-XXL's wo: 10240^2 floats).
HESSIAN_GROUP_BYTES = 2 << 30


def call_model(model: nn.Module, **sample: Any) -> Any:
    return model(**sample)


def output_tensors(output: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a model's output, in order (a tensor, tuples, lists, dicts, dataclasses)."""
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, Mapping):
        values = list(output.values())
    elif isinstance(output, (list, tuple)):
        values = list(output)
    elif hasattr(output, "__dataclass_fields__"):
        values = [getattr(output, name) for name in output.__dataclass_fields__]
    else:
        return []
    return [tensor for value in values for tensor in output_tensors(value)]


def run_samples(model: nn.Module, samples: Sequence[Sample], forward: Forward) -> list[list[torch.Tensor]]:
    """Each sample's output tensors, as float32 copies."""
    with torch.no_grad():
        return [_float_copies(forward(model, **sample)) for sample in samples]


def _float_copies(output: Any) -> list[torch.Tensor]:
    tensors = output_tensors(output)
    if not tensors:
        raise ValueError("sample_inputs: the model's output holds no floating-point tensor to compare")
    return [tensor.detach().float().clone() for tensor in tensors]


def output_error(outputs: list[list[torch.Tensor]], references: list[list[torch.Tensor]]) -> float:
    """Relative error ||out - ref|| / ||ref|| over every output tensor of every sample (float64 sums)."""
    diff = total = 0.0
    for sample_out, sample_ref in zip(outputs, references):
        for out, ref in zip(sample_out, sample_ref):
            ref = ref.to(out.device)
            diff += float((out.double() - ref.double()).square().sum())
            total += float(ref.double().square().sum())
    if not total > 0:
        raise ValueError("sample_inputs: the reference outputs are all zero; give prompts that produce an output")
    return (diff / total) ** 0.5


def input_hessians(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    samples: Sequence[Sample],
    forward: Forward,
    max_bytes: int = HESSIAN_GROUP_BYTES,
    outputs: list[list[torch.Tensor]] | None = None,
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """``(name, X^T X / rows)`` for each of ``layers``: float32 ``[K, K]`` on the layer's device; ``None`` for a
    layer the samples never reach (a vision tower beside a text model).

    Layers are taken in groups whose Hessians fit ``max_bytes``, one pass over the samples per group; a group is
    yielded layer by layer (the caller can free each once used). ``outputs``: where given, the first pass also
    appends each sample's output tensors to it, as ``run_samples`` returns them (the reference outputs come with
    the statistics instead of costing a pass of their own).
    """
    names = list(layers)
    if not names and outputs is not None:
        outputs.extend(run_samples(model, samples, forward))
    while names:
        group, size = [], 0
        for name in names:
            k = layers[name].weight.shape[1]
            if group and size + 4 * k * k > max_bytes:
                break
            group.append(name)
            size += 4 * k * k
        names = names[len(group) :]
        stats = _collect(model, {name: layers[name] for name in group}, samples, forward, outputs)
        outputs = None
        for name in group:
            hessian, rows = stats.pop(name)
            yield name, (hessian / rows if rows else None)


def _collect(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    samples: Sequence[Sample],
    forward: Forward,
    outputs: list[list[torch.Tensor]] | None,
) -> dict[str, tuple[torch.Tensor, int]]:
    stats: dict[str, list] = {}

    def hook_for(name: str, module: nn.Module):
        def hook(_module: nn.Module, args: tuple, _kwargs: dict | None = None) -> None:
            x = args[0].detach()
            rows = x.reshape(-1, x.shape[-1]).to(module.weight.device, torch.float32)
            entry = stats.get(name)
            if entry is None:
                k = rows.shape[1]
                entry = stats[name] = [torch.zeros(k, k, dtype=torch.float32, device=rows.device), 0]
            entry[0].addmm_(rows.t(), rows)
            entry[1] += rows.shape[0]

        return hook

    handles = [module.register_forward_pre_hook(hook_for(name, module)) for name, module in layers.items()]
    try:
        with torch.no_grad():
            for sample in samples:
                output = forward(model, **sample)
                if outputs is not None:
                    outputs.append(_float_copies(output))
    finally:
        for handle in handles:
            handle.remove()
    return {name: (stats[name][0], stats[name][1]) if name in stats else (None, 0) for name in layers}
