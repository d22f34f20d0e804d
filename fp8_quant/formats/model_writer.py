"""Write a model as it runs: its fp8 layers with their scales and input scales, everything else as it is held.

What Save FP8 Model (and anything holding a model quantized by this pack) writes, so that a graph's quantization,
calibrated input scales included, outlives the running process and loads in stock ComfyUI. One layer at a time: the
header is planned from the modules' shapes, then each tensor is made (copied to the host, re-quantized where the
format needs it) just before it is written, so peak memory stays near one layer.

Per format:
- ``comfy-quant``: ``weight_scale`` + ``input_scale`` + a ``.comfy_quant`` JSON per fp8 layer (ComfyUI 0.16+ and
  this pack). ``comfy-scaled``: ``scale_weight`` + ``scale_input`` + the ``scaled_fp8`` marker (any ComfyUI).
  Both hold one scale per tensor, as ComfyUI's fp8 layers read them: a layer with per-channel or block scales is
  re-quantized per tensor from its dequantized weight (one more fp8 rounding; the report counts them).
- ``weight-scale``: this pack's own loader: every granularity as it is (per-channel ``[N, 1]``, blocks), exact.
- int8 layers (rotated or not) only in ``comfy-quant``, as ComfyUI 0.30's ``int8_tensorwise``: exact.

Input scales: a file's static ``input_scale`` as it is; a scale learnt at run time (``auto_scales``) as the static
scale it stands for (``history * margin / 448``), also for layers that chose per-token scales, since stock ComfyUI
otherwise quantizes at unit scale. A layer that has never run has none (the report says how many).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..fp8_utils import dequantize, quantize_weight
from ..layer_state import fp8_layers as quantized_layers
from ..layer_state import layer_state
from ..params import Fp8LinearParams
from ..quant_int8 import dequantize_int8_weight, quantize_int8_weight
from ..scheme import PER_TENSOR
from .comfy_formats import INT8_TENSORWISE
from .dialects import COMFY_QUANT, DEFAULT_OUTPUT_FORMAT, Dialect, output_dialect, written_by
from .streaming import PlannedTensor, write_streaming

logger = logging.getLogger(__name__)

ParamsOf = Callable[[nn.Module], Fp8LinearParams]


@dataclass
class SaveReport:
    """What a model save wrote."""

    path: Path
    output_format: str
    fp8_layers: int = 0
    requantized: int = 0
    input_scales: int = 0
    kept: list[str] = field(default_factory=list)
    bytes_out: int = 0
    int8_layers: int = 0
    rotated_groups: dict[int, int] = field(default_factory=dict)  # ConvRot group -> int8 layers rotated in it
    int8_regrouped: int = 0  # int8 layers with group scales, re-rounded to one scale per channel

    def summary(self) -> str:
        parts = [f"{self.fp8_layers} fp8 layers ({self.input_scales} with calibrated input scales)"]
        if self.int8_layers and not self.fp8_layers:
            parts = []
        if self.int8_layers:
            rotated = ", ".join(f"{count} rotated in groups of {group}" for group, count in
                                sorted(self.rotated_groups.items()))
            parts.append(
                f"{self.int8_layers} int8 layers as ComfyUI's int8_tensorwise" + (f" ({rotated})" if rotated else "")
                + ", read by ComfyUI 0.30+ and this pack"
            )
        if self.int8_regrouped:
            parts.append(
                f"{self.int8_regrouped} int8 layers with one scale per group re-rounded to one per channel "
                "(int8_tensorwise has no group scales)"
            )
        if self.requantized:
            parts.append(f"{self.requantized} re-quantized per tensor for the {self.output_format} format")
        if self.fp8_layers > self.input_scales and self.fp8_layers:
            parts.append(
                f"{self.fp8_layers - self.input_scales} without one: not run yet, or run with high-precision "
                "activations (no FP8 GPU and no activation scheme chosen); sample a step first to calibrate them"
            )
        return f"{self.path.name} ({self.output_format}): " + "; ".join(parts) + f"; {self.bytes_out / 2**20:.1f} MiB"


# Safetensors metadata that describes the model itself rather than how its file was written: ComfyUI's model
# detection reads ``config`` (its ``transformer`` part) for settings the weights cannot tell (Wan's head count and
# text width, LTX-2), so a saved model must carry it on or the stock loader builds another model.
ARCHITECTURE_METADATA_KEYS = ("config",)


def architecture_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    """The entries of a source file's metadata that a file written from the same model must keep."""
    return {key: metadata[key] for key in ARCHITECTURE_METADATA_KEYS if metadata and key in metadata}

def save_quantized_model(
    model: nn.Module,
    destination: str | os.PathLike,
    output_format: str = DEFAULT_OUTPUT_FORMAT,
    *,
    key_prefix: str = "",
    params_of: ParamsOf = Fp8LinearParams.from_layer,
    metadata: dict[str, str] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    overwrite: bool = True,
) -> SaveReport:
    """Write ``model``'s state as it runs to ``destination`` in ``output_format`` (a written dialect's name; int8
    layers need one that holds them, ``comfy-quant``); keys get ``key_prefix``.

    ``params_of``: a quantized layer's current tensors (ComfyUI's layers give a LoRA-patched weight with its own
    scale through theirs). ``overwrite=False``: an existing ``destination`` (one another writer creates meanwhile
    too) is an error and is left as it is. The file appears whole or not at all.
    """
    dialect = output_dialect(output_format)
    destination = Path(destination)
    report = SaveReport(destination, dialect)
    plan: list[PlannedTensor] = []
    fp8_layers = dict(quantized_layers(model))
    if not fp8_layers:
        raise ValueError(f"{type(model).__name__} has no 8-bit layers: nothing quantized to save")
    weight_dtypes = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        layer_name, _, attribute = key.rpartition(".")
        layer = fp8_layers.get(layer_name)
        if layer is None:
            plan.append(_as_stored(key_prefix + key, tensor))
        elif attribute == "weight":
            params = params_of(layer)
            if params.weight.dtype == torch.int8:
                if not dialect.holds_int8:
                    holder = written_by(lambda other: other.holds_int8)
                    raise ValueError(
                        f"format: {layer_name} is an int8 layer, which only the {holder} format holds "
                        f"(ComfyUI's int8_tensorwise); {dialect} files hold fp8 layers only"
                    )
                plan += _int8_layer_plan(key_prefix + layer_name, layer, params, report)
                continue
            weight_dtypes.add(params.weight.dtype)
            plan += _fp8_layer_plan(key_prefix + layer_name, layer, params, dialect, report)
        elif attribute not in ("weight_scale", "input_scale"):
            plan.append(_as_stored(key_prefix + key, tensor))
    if not dialect.holds_mixed_fp8_dtypes and len(weight_dtypes) > 1:
        raise ValueError(f"{dialect} files hold one fp8 dtype; this model mixes e4m3 and e5m2: use {COMFY_QUANT}")
    if weight_dtypes:
        plan += dialect.file_entries(key_prefix, weight_dtypes.pop())
    info = {"format": str(dialect), "writer": "save_quantized_model"}
    write_streaming(destination, plan, {**(metadata or {}), "fp8_quant": json.dumps(info)}, progress, overwrite)
    report.bytes_out = destination.stat().st_size
    logger.info(report.summary())
    return report


def learnt_input_scale(layer: nn.Module) -> torch.Tensor | None:
    """The layer's static input scale: its file's, else the one its activations taught it at run time."""
    if getattr(layer, "input_scale", None) is not None:
        return layer.input_scale.detach().float().reshape(())
    state = layer_state(layer)
    learnt = state.activation if state is not None else None
    return learnt.static_input_scale() if learnt is not None else None


def _fp8_layer_plan(
    name: str, layer: nn.Module, params: Fp8LinearParams, dialect: Dialect, report: SaveReport
) -> list[PlannedTensor]:
    """The weight, its scale, the input scale and the format marker of one fp8 layer."""
    report.fp8_layers += 1
    weight, group = params.weight, params.weight_group
    exact = dialect.holds_group(group)
    report.requantized += not exact
    cache: dict[str, torch.Tensor] = {}

    def stored_weight() -> torch.Tensor:
        if exact:
            cache["scale"] = params.weight_scale.detach().float().cpu()
            return weight.detach().cpu()
        real = dequantize(weight.detach(), params.weight_scale.detach(), torch.float32, group)
        fp8_weight, scale = quantize_weight(real, weight.dtype, PER_TENSOR)
        cache["scale"] = scale.cpu()
        return fp8_weight.cpu()

    scale_shape = dialect.stored_scale_shape(tuple(params.weight_scale.shape), group) if exact else ()
    scale_key, input_key = dialect.scale_keys(name)
    plan = [
        PlannedTensor(f"{name}.weight", weight.dtype, tuple(weight.shape), stored_weight),
        PlannedTensor(scale_key, torch.float32, scale_shape, lambda: cache.pop("scale").reshape(scale_shape)),
    ]
    input_scale = learnt_input_scale(layer)
    if input_scale is not None:
        report.input_scales += 1
        value = input_scale.detach().float().cpu().reshape(())
        plan.append(PlannedTensor(input_key, torch.float32, (), lambda: value))
    return plan + dialect.layer_entries(name, weight.dtype)


def _int8_layer_plan(name: str, layer: nn.Module, params: Fp8LinearParams, report: SaveReport) -> list[PlannedTensor]:
    """An int8 layer as ComfyUI 0.30 writes ``int8_tensorwise``: the int8 weight as the layer holds it (rotated in
    its ConvRot group, if it is), a float32 scale ``[N, 1]`` per channel or ``[]`` per tensor, and a
    ``.comfy_quant`` JSON naming the format and the rotation; no input scale (activations are scaled per row at
    every call). Exact: the stored values are those that run, except for a layer with one scale per group, which
    ComfyUI's format cannot hold: its rotated values are rounded again with one scale per channel."""
    report.int8_layers += 1
    config = layer.fp8.layer_config
    group = getattr(config, "rotation_group", None)
    weight, scale = params.weight, params.weight_scale
    scale_shape = (weight.shape[0], 1) if scale.dim() else ()
    entry: dict = {"format": INT8_TENSORWISE}
    if group is not None:
        entry.update(convrot=True, convrot_groupsize=int(group))
        report.rotated_groups[int(group)] = report.rotated_groups.get(int(group), 0) + 1

    def stored_weight() -> torch.Tensor:
        return weight.detach().cpu().contiguous()

    def stored_scale() -> torch.Tensor:
        return scale.detach().float().cpu().reshape(scale_shape)

    if scale.dim() == 2:
        report.int8_regrouped += 1
        stored_weight, stored_scale = _regrouped(weight, scale)
    return [
        PlannedTensor(f"{name}.weight", torch.int8, tuple(weight.shape), stored_weight),
        PlannedTensor(f"{name}.weight_scale", torch.float32, scale_shape, stored_scale),
        COMFY_QUANT.format_entry(name, entry),
    ]


def _regrouped(weight: torch.Tensor, scale: torch.Tensor) -> tuple[Callable, Callable]:
    """Readers of an int8 weight with group scales rounded again with one scale per channel (in its rotated
    form): the work is done when the writer first asks, and dropped once both tensors are read, so a whole
    model's re-rounded copies never sit in memory at once."""
    held: dict[str, torch.Tensor] = {}

    def take(which: str) -> torch.Tensor:
        if not held:
            held["weight"], held["scale"] = quantize_int8_weight(
                dequantize_int8_weight(weight.detach(), scale.detach(), None), per_channel=True
            )
        return held.pop(which)

    return (lambda: take("weight").cpu().contiguous()), (lambda: take("scale").float().cpu().reshape(-1, 1))


def _as_stored(key: str, tensor: torch.Tensor) -> PlannedTensor:
    """A high-precision tensor: bf16 where that holds it exactly (weights loaded from a bf16 file, held in fp32 on a
    CPU), else its own dtype (fp16 compute copies, values bf16 would round)."""
    dtype = tensor.dtype
    if dtype in (torch.float32, torch.float16) and _exact_in_bf16(tensor):
        dtype = torch.bfloat16
    return PlannedTensor(key, dtype, tuple(tensor.shape), lambda: tensor.detach().to("cpu", dtype).contiguous())


def _exact_in_bf16(tensor: torch.Tensor) -> bool:
    values = tensor.detach()
    return bool(torch.equal(values.to(torch.bfloat16).to(values.dtype), values))
