"""Turn the ``nn.Linear`` modules of an already built model into fp8 linears.

The bridge is how ``fp8_quant`` reaches models it did not build (a ComfyUI CLIP, a transformers model, a test
MLP). Each non-skipped linear gets new fp8 parameters and a forward that calls the method's kernel; nothing is
written into the old tensors, so a model that shares them (a ComfyUI clone, the caller's original) keeps its
bytes. ``clone_module_tree`` gives such a sharing copy without duplicating any tensor.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import Fp8Config, matching_pattern
from .fp8_utils import is_fp8_dtype
from .kernels import explain_choice
from .methods import Fp8LinearMethod, Fp8OnlineLinearMethod

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, str], None]
# How a quantized linear gets its fp8 forward; the default sets an instance ``forward``. ComfyUI glue passes
# one that swaps in a class taking part in ComfyUI's LoRA and offload protocols.
ForwardInstaller = Callable[[nn.Linear], None]


@dataclass
class LayerReport:
    name: str
    quantized: bool
    reason: str
    bytes_before: int
    bytes_after: int


@dataclass
class Fp8Report:
    """What ``prepare_model_for_fp8`` did, layer by layer, for logs and for the node's UI text."""

    config: Fp8Config
    layers: list[LayerReport] = field(default_factory=list)
    kernel_choice: str = ""

    @property
    def quantized(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.quantized]

    @property
    def skipped(self) -> list[LayerReport]:
        return [layer for layer in self.layers if not layer.quantized]

    @property
    def bytes_before(self) -> int:
        return sum(layer.bytes_before for layer in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(layer.bytes_after for layer in self.layers)

    def summary(self) -> str:
        skipped = count_labels(layer.reason for layer in self.skipped)
        kept_fp8 = count_labels(layer.reason for layer in self.quantized if layer.reason != "quantized")
        text = (
            f"fp8: {len(self.quantized)}/{len(self.layers)} linears quantized"
            f"{f' ({kept_fp8})' if kept_fp8 else ''}"
            f"{f' (skipped: {skipped})' if skipped else ''}; linear weights "
            f"{_mib(self.bytes_before)} -> {_mib(self.bytes_after)}; {self.config.describe()}"
        )
        if self.kernel_choice:
            text += f"; kernel {self.kernel_choice}"
        return text


def count_labels(labels: Iterable[str]) -> str:
    """"2 a, 1 b": how many of each label, for one-line summaries."""
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    return ", ".join(f"{count} {label}" for label, count in sorted(counts.items()))


def prepare_model_for_fp8(
    model: nn.Module,
    config: Fp8Config,
    *,
    kernel: str | None = None,
    quantize_device: torch.device | str | None = None,
    compute_device: torch.device | str | None = None,
    progress: ProgressCallback | None = None,
    install: ForwardInstaller | None = None,
) -> Fp8Report:
    """Quantize every non-skipped ``nn.Linear`` (subclasses included) of ``model`` in place; return a report.

    ``quantize_device`` is where each weight is quantized (the GPU is much faster); results go back to the
    weight's own device. ``compute_device`` only fills the report's kernel choice (the kernel is chosen per
    device at forward time). Run it on ``clone_module_tree(model)`` or a deep copy to keep ``model`` as it is.
    """
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers to quantize to fp8")
    method = Fp8OnlineLinearMethod(config, kernel)
    report = Fp8Report(config)
    for index, (name, module) in enumerate(linears):
        report.layers.append(_prepare_layer(name, module, method, config, quantize_device, install))
        if progress is not None:
            progress(index + 1, len(linears), name)
    quantized = [module for _, module in linears if hasattr(module, "fp8_layer_config")]
    if quantized:
        device = torch.device(compute_device) if compute_device is not None else quantized[0].weight.device
        _, report.kernel_choice = explain_choice(quantized[0].fp8_layer_config, device, kernel)
    else:
        logger.warning("no linear of %s was quantized: every one was skipped", type(model).__name__)
    logger.info(report.summary())
    return report


def _prepare_layer(
    name: str,
    module: nn.Linear,
    method: Fp8OnlineLinearMethod,
    config: Fp8Config,
    quantize_device: torch.device | str | None,
    install: ForwardInstaller | None,
) -> LayerReport:
    weight = module.weight
    size = weight.numel() * weight.element_size() if weight is not None else 0
    if hasattr(module, "fp8_layer_config"):
        return LayerReport(name, False, "already fp8", size, size)
    pattern = matching_pattern(name, config.ignored_layers)
    if pattern is not None:
        return LayerReport(name, False, f"matched {pattern!r}", size, size)
    if weight is None or weight.device.type == "meta":
        return LayerReport(name, False, "no materialised weight", size, size)
    if is_fp8_dtype(weight.dtype):
        # A plain fp8 cast (how ComfyUI holds an fp8 text-encoder file on a GPU): the stored values are the
        # weights, at unit scale. Re-quantizing cannot win back precision, so they are used as they are.
        module.weight_scale = nn.Parameter(torch.ones((), device=weight.device), requires_grad=False)
        module.input_scale = None
        unit_scale_method = Fp8LinearMethod(config, method.kernel)
        unit_scale_method.process_weights_after_loading(module, name)
        module.fp8_method = unit_scale_method
        (install or install_instance_forward)(module)
        return LayerReport(name, True, "fp8 weight used as it is (unit scale)", size, fp8_layer_bytes(module))
    if not weight.dtype.is_floating_point or weight.dim() != 2:
        return LayerReport(name, False, f"unsupported weight {weight.dtype} {tuple(weight.shape)}", size, size)
    method.process_weights_after_loading(module, name, quantize_device)
    module.fp8_method = method
    (install or install_instance_forward)(module)
    return LayerReport(name, True, "quantized", size, fp8_layer_bytes(module))


def fp8_layer_bytes(module: nn.Module) -> int:
    """What a quantized linear's weight costs: the fp8 weight plus its float32 scales."""
    return module.weight.numel() * module.weight.element_size() + module.weight_scale.numel() * 4


def install_instance_forward(module: nn.Linear) -> None:
    module.forward = types.MethodType(fp8_linear_forward, module)


def fp8_linear_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The forward of a bridged linear: the method's kernel does the product."""
    return self.fp8_method.apply(self, x, self.bias)


def clone_module_tree(model: nn.Module) -> nn.Module:
    """New module objects over the same storage: a copy that costs no memory and can be patched safely.

    Parameters are new ``Parameter`` objects over the same data and buffers, parameters and submodules sit in
    fresh dicts, so neither assigning a parameter on the copy nor moving the original to another device (which
    rebinds ``param.data`` on the original's own ``Parameter`` objects) reaches the other model.
    """
    memo: dict[int, nn.Module] = {}

    def clone(module: nn.Module) -> nn.Module:
        if id(module) in memo:
            return memo[id(module)]
        new = module.__class__.__new__(module.__class__)
        new.__dict__ = dict(module.__dict__)
        new._parameters = {
            key: (nn.Parameter(param.data, requires_grad=param.requires_grad) if param is not None else None)
            for key, param in module._parameters.items()
        }
        new._buffers = dict(module._buffers)
        memo[id(module)] = new
        new._modules = {key: (clone(child) if child is not None else None) for key, child in module._modules.items()}
        if "fp8_kernels" in new.__dict__:
            new.fp8_kernels = {}
        forward = new.__dict__.get("forward")
        if isinstance(forward, types.MethodType) and forward.__self__ is module:
            new.forward = types.MethodType(forward.__func__, new)
        return new

    return clone(model)


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"
