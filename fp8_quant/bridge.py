"""Turn the ``nn.Linear`` modules of an already built model into fp8 linears.

The bridge is how ``fp8_quant`` reaches models it did not build (a ComfyUI CLIP, a transformers model, a test
MLP). Each linear gets what ``dispatch.Fp8Recipe`` decides for it; a quantized one gets new fp8 parameters and a
forward that calls the method's kernel. Nothing is written into the old tensors, so a model that shares them (a
ComfyUI clone, the caller's original) keeps its bytes. ``clone_module_tree`` gives such a sharing copy without
duplicating any tensor.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable

import torch
from torch import nn

from .config import Fp8Config, Int8Config
from .cuda_graphs import GraphedForward
from .dispatch import Fp8Recipe
from .layer_loader import load_layer
from .layer_state import is_fp8_layer, layer_state
from .report import Fp8Report

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, str], None]
# How a quantized linear gets its fp8 forward; the default sets an instance ``forward``. ComfyUI glue passes
# one that swaps in a class taking part in ComfyUI's LoRA and offload protocols.
ForwardInstaller = Callable[[nn.Linear], None]


def prepare_model_for_fp8(
    model: nn.Module,
    config: Fp8Config | Int8Config | Fp8Recipe,
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
    ``config`` may be a whole ``Fp8Recipe`` (per-layer overrides computed for this model, ``text_encoder``).
    """
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers to quantize to fp8")
    recipe = config if isinstance(config, Fp8Recipe) else Fp8Recipe.for_model(config, kernel)
    kernel = recipe.kernel
    report = Fp8Report(recipe.config)
    install = install or install_instance_forward
    for index, (name, module) in enumerate(linears):
        weight = module.weight
        report.layers.append(load_layer(module, name, recipe, weight, quantize_device=quantize_device, install=install))
        if progress is not None:
            progress(index + 1, len(linears), name)
    quantized = [module for _, module in linears if is_fp8_layer(module)]
    if quantized:
        device = torch.device(compute_device) if compute_device is not None else quantized[0].weight.device
        prepare_kernels(report, quantized, device, kernel)
    else:
        logger.warning("no linear of %s was quantized: every one was skipped", type(model).__name__)
    logger.info(report.summary())
    return report


def prepare_kernels(report: Fp8Report, quantized: list[nn.Module], device: torch.device, kernel: str | None) -> None:
    """Every quantized layer's kernels chosen now for ``device`` (outside any ``torch.compile`` trace), and the
    report's kernel sentence: which kernel runs and whether activations are really rounded to 8 bits on ``device``
    (the dequantize kernel of CPUs and GPUs without FP8 tensor cores keeps them in high precision unless asked to
    round them, and then nothing is calibrated either, so the summary must not say it is)."""
    for layer in quantized:
        layer.fp8.method.prepare_kernels(layer, device)
    first = quantized[0].fp8
    report.kernel_choice = first.method.explain_kernel(quantized[0], device, kernel)
    report.activations_rounded = any(layer.fp8.method.kernel_for(layer, device).input_quant is not None
                                     for layer in quantized)  # fmt: skip


def install_instance_forward(module: nn.Linear) -> None:
    module.forward = types.MethodType(fp8_linear_forward, module)


def fp8_linear_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The forward of a bridged linear: the method's kernel does the product."""
    return self.fp8.method.apply(self, x, self.bias)


def clone_module_tree(model: nn.Module) -> nn.Module:
    """New module objects over the same storage: a copy that costs no memory and can be patched safely.

    Parameters are new ``Parameter`` objects over the same data and buffers, parameters and submodules sit in
    fresh dicts, so neither assigning a parameter on the copy nor moving the original to another device (which
    rebinds ``param.data`` on the original's own ``Parameter`` objects) reaches the other model.

    Iterative, with no closure over the memo: a recursive inner function that refers to itself forms a reference
    cycle holding the whole copy until a full garbage collection (ComfyUI reports that as a memory leak).
    """
    memo: dict[int, nn.Module] = {}
    order: list[nn.Module] = []
    stack = [model]
    while stack:
        module = stack.pop()
        if id(module) in memo:
            continue
        memo[id(module)] = _shallow_module_copy(module)
        order.append(module)
        stack.extend(child for child in module._modules.values() if child is not None)
    for module in order:
        new = memo[id(module)]
        new._modules = {key: (memo[id(child)] if child is not None else None) for key, child in module._modules.items()}
    copy = memo[id(model)]
    memo.clear()
    return copy


def _shallow_module_copy(module: nn.Module) -> nn.Module:
    new = module.__class__.__new__(module.__class__)
    new.__dict__ = dict(module.__dict__)
    new._parameters = {
        key: (nn.Parameter(param.data, requires_grad=param.requires_grad) if param is not None else None)
        for key, param in module._parameters.items()
    }
    new._buffers = dict(module._buffers)
    state = layer_state(module)
    if state is not None:  # kernels and learnt scales are per model
        new.fp8 = state.for_copy()
    forward = new.__dict__.get("forward")
    if isinstance(forward, GraphedForward):  # graphs of the original's memory: the copy runs eagerly
        del new.forward
        forward = forward.previous
        if forward is not None:
            new.forward = forward
    if isinstance(forward, types.MethodType) and forward.__self__ is module:
        new.forward = types.MethodType(forward.__func__, new)
    return new
