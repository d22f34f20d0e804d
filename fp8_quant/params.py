"""``Fp8LinearParams``: the tensors a kernel multiplies with, apart from the module that holds them.

Kernels take this type, never a module: the same kernel serves a layer's own parameters, a LoRA-patched weight
with its own scale, and a weight ComfyUI streamed in from the offload device for one call, without stand-in
objects. Modelled on vLLM's ``FP8Params.from_layer``.

Layout (what every method produces and every kernel reads):
- ``weight``: fp8 ``[N, K]`` contiguous. Passing ``weight.t()`` gives ``_scaled_mm`` the column-major ``[K, N]``
  operand it wants, and the parameter keeps the ``nn.Linear`` shape that LoRA and state dicts expect.
- ``weight_scale``: float32, shaped by ``weight_group`` as ``scheme.weight_scale_shape`` says.
- ``input_scale``: float32 ``[]`` for static activations, else ``None``.
- ``activation_quantizer``: where activation scales are learnt at run time (``auto_scales``), the function that
  quantizes this call's activations ``x -> (x_fp8, scale)`` in place of the kernel's own; else ``None``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from .scheme import GroupShape


class Fp8LinearParams(NamedTuple):
    weight: torch.Tensor
    weight_scale: torch.Tensor
    input_scale: torch.Tensor | None
    weight_group: GroupShape
    activation_quantizer: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None

    @classmethod
    def from_layer(cls, layer: nn.Module) -> Fp8LinearParams:
        """A layer's own tensors, read at call time (ComfyUI swaps a layer's parameters when it patches or moves it),
        and its learning activation quantizer (``layer_state``)."""
        state = layer.fp8
        group = state.layer_config.weight_quant_key.group_shape
        return cls(layer.weight, layer.weight_scale, layer.input_scale, group, state.activation)

    def to(self, device: torch.device) -> Fp8LinearParams:
        """The same tensors on ``device``; a no-op for a layer that is there (the usual case)."""
        if self.weight.device == device and self.weight_scale.device == device:
            if self.input_scale is None or self.input_scale.device == device:
                return self
        input_scale = self.input_scale.to(device, non_blocking=True) if self.input_scale is not None else None
        return self._replace(
            weight=self.weight.to(device, non_blocking=True),
            weight_scale=self.weight_scale.to(device, non_blocking=True),
            input_scale=input_scale,
        )
