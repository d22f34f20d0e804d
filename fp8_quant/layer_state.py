"""An 8-bit layer's state: one attribute, ``layer.fp8``, and the one test of whether a module has it.

Everything the core knows about a quantized linear beyond its tensors lives in one ``Fp8LayerState``: the method
that made it (its config is the layer's plan), the layer's own scheme as kernels read it, its name for messages, its
kernels by device, and the activation quantizer whose scale it learns while it runs. The tensors (``weight``,
``weight_scale``, ``input_scale``) stay parameters of the module: state dicts, ``.to()`` and ComfyUI's patcher move
them. Nothing else is written onto the module, so a copy of a module (``bridge.clone_module_tree``) gets a fresh
state with one assignment (``Fp8LayerState.for_copy``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .auto_scales import RuntimeActivationScale
    from .prepared import PreparedCall

STATE_ATTRIBUTE = "fp8"


@dataclass(eq=False)
class Fp8LayerState:
    """``method``: the layer's linear method (``Fp8LinearMethod``, ``Int8LinearMethod`` or their online forms);
    ``layer_config``: the layer's own scheme (its scale shape, rotation group, ...) that kernel selection reads;
    ``kernels``: the kernel that runs the layer now, by device; ``activation``: where the layer learns its
    activation scale at run time, the quantizer that does it (``auto_scales.RuntimeActivationScale``);
    ``patched``: a LoRA-patched weight (weakly) with its own scale; ``scales_on_device``: scales copied once to
    the compute device for an offloaded layer; ``prepared``: the layer's call with what does not change between
    calls worked out once (``prepared``), while it holds."""

    method: Any
    layer_config: Any
    name: str
    kernels: dict[torch.device, Any] = field(default_factory=dict)
    activation: RuntimeActivationScale | None = None
    patched: tuple[weakref.ref, torch.Tensor] | None = None
    scales_on_device: dict = field(default_factory=dict)
    prepared: PreparedCall | None = None

    @property
    def plan(self):
        """The layer's resolved config (its method's)."""
        return self.method.config

    def for_copy(self) -> Fp8LayerState:
        """The state of a copy of the module: the same plan and scheme; kernels, learnt scales and device copies
        of its own (they are per model)."""
        return replace(self, kernels={}, activation=None, scales_on_device={}, prepared=None)

    def current_weight_scale(self, layer: nn.Module) -> torch.Tensor:
        """The scale of the weight ``layer`` holds now: a LoRA-patched weight brings its own scale, and when
        ComfyUI's unpatch puts the backed-up weight back, the layer's own scale applies again."""
        patched = self.patched
        if patched is not None and patched[0]() is layer.weight:
            return patched[1]
        return layer.weight_scale


def is_fp8_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a quantized (8-bit: fp8 or int8) linear of this pack."""
    return module.__dict__.get(STATE_ATTRIBUTE) is not None


def layer_state(module: nn.Module) -> Fp8LayerState | None:
    """The module's 8-bit state, ``None`` for any other module."""
    return module.__dict__.get(STATE_ATTRIBUTE)


def fp8_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The quantized linears of ``model`` with their names, in module order."""
    return [(name, module) for name, module in model.named_modules() if is_fp8_layer(module)]


__all__ = ["Fp8LayerState", "fp8_layers", "is_fp8_layer", "layer_state"]
