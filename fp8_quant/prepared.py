"""A layer's prepared call: its product with everything that stays the same from call to call worked out once.

Why: at a few hundred tokens (a text encoder, a small DiT, a modulation linear) an 8-bit linear waits for the host,
not the GPU, and the general path pays at every call for its layering: the layer's tensors gathered into
``Fp8LinearParams``, the kernel looked up by device, the output dtype, the bias cast, the quantizer's phase and
launch choices, the weight scale reshaped for the GEMM. A ``PreparedCall`` is made after a call of the general
path (per layer, device and input dtype) and holds the kernel's bound product (``kernel.prepare``); later calls
check, with identity tests and a few integers, that nothing it was made from has changed, and run it:

- the same weight parameter at the same address (LoRA's ``set_weight`` puts in a new parameter; ComfyUI's moves
  swap a parameter's storage), the same weight scale (a patched weight brings its own: ``current_weight_scale``),
  input scale and bias, at the same address and in-place version;
- the same kernel in ``state.kernels`` for the device (a learnt scale's phase change swaps kernels) and the same
  phase of the learning quantizer;
- an input of the same dtype on the same device.

Anything else takes the general path, which makes a new prepared call after it. The weight itself is never held
(a weak reference to the parameter only): a copy or a view would keep its memory alive after ComfyUI moves the
model off the GPU. Nothing here runs inside ``torch.compile`` or while a CUDA graph is captured (the general path
does, as before), nor for a layer whose weight is not on the input's device (lowvram offload).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .fp8_utils import tensor_version

if TYPE_CHECKING:
    from .layer_state import Fp8LayerState

# (x, weight) -> output: the kernel's product with everything else bound (``FP8ScaledMMLinearKernel.prepare``).
Product = Callable[[Tensor, Tensor], Tensor]
_HELD = ("weight_scale", "input_scale", "bias")


def _identity(tensor: Tensor | None) -> tuple | None:
    """What shows that a small tensor a prepared call derived something from is still as it was."""
    return None if tensor is None else (tensor.data_ptr(), tensor_version(tensor))


class PreparedCall:
    """One layer's bound product for inputs of one dtype on one device, and what it was made from."""

    __slots__ = ("activation", "bias", "device", "dtype", "held", "input_scale", "kernel", "phase", "product",
                 "scale", "weight", "weight_ptr")  # fmt: skip

    def __init__(self, state: Fp8LayerState, kernel, product: Product, weight: Tensor, scale: Tensor,
                 input_scale: Tensor | None, bias: Tensor | None, x: Tensor) -> None:  # fmt: skip
        self.kernel, self.product = kernel, product
        self.activation = state.activation
        self.phase = self.activation.phase if self.activation is not None else None
        self.weight, self.weight_ptr = weakref.ref(weight), weight.data_ptr()
        self.scale, self.input_scale, self.bias = scale, input_scale, bias
        self.held = (_identity(scale), _identity(input_scale), _identity(bias))
        self.device, self.dtype = x.device, x.dtype

    def serve(self, layer: nn.Module, state: Fp8LayerState, x: Tensor, bias: Tensor | None) -> Tensor | None:
        """The layer's output for ``x`` where this call still holds, else ``None`` (the caller takes the general
        path). ``bias``: the one the caller multiplies with (the layer's own)."""
        parameters = layer._parameters
        weight = parameters.get("weight")
        if self.weight() is not weight or weight.data_ptr() != self.weight_ptr:
            return None
        patched = state.patched
        scale = patched[1] if patched is not None and patched[0]() is weight else parameters.get("weight_scale")
        input_scale = parameters.get("input_scale")
        if scale is not self.scale or input_scale is not self.input_scale or bias is not self.bias:
            return None
        if x.dtype is not self.dtype or x.device != self.device or state.kernels.get(self.device) is not self.kernel:
            return None
        if self.activation is not None and self.activation.phase is not self.phase:
            return None
        if (_identity(scale), _identity(input_scale), _identity(bias)) != self.held:
            return None
        return self.product(x, weight)


def serve_prepared(layer: nn.Module, state: Fp8LayerState, x: Tensor, bias: Tensor | None) -> Tensor | None:
    """The layer's output through its prepared call where one holds (never inside ``torch.compile``), else ``None``:
    the caller runs the general path and then ``prepare_call``."""
    prepared = state.prepared
    if prepared is None or torch.compiler.is_compiling():
        return None
    return prepared.serve(layer, state, x, bias)


def general_product(apply, weight_scale: Tensor, input_scale: Tensor | None, group, activation,
                    bias: Tensor | None) -> Product:  # fmt: skip
    """A kernel's ``apply`` with the layer's tensors other than the weight bound: what every kernel can be prepared
    as (it skips the layer's layering, not the kernel's own)."""
    from .params import Fp8LinearParams

    params = Fp8LinearParams(None, weight_scale, input_scale, group, activation)  # type: ignore[arg-type]

    def product(x: Tensor, weight: Tensor) -> Tensor:
        return apply(params._replace(weight=weight), x, bias)

    return product


class ColdLaunch(RuntimeError):
    """Raised by a bound product's piece, before it has done anything, where it does not run now (the one-launch
    linear's first launch for an input, inside a CUDA-graph capture); the product then takes its other path for
    this call (two launches)."""


_generation = [0]


def generation() -> int:
    """How many prepared calls have been replaced or dropped in this process. A CUDA graph captured through a
    prepared call reads the small tensors it derived (a scale row, a cast bias); once that call is gone they may
    be freed, so ``cuda_graphs`` drops graphs captured before the count last changed."""
    return _generation[0]


def prepare_call(layer: nn.Module, state: Fp8LayerState, x: Tensor, bias: Tensor | None) -> None:
    """After a call of the general path: the layer's prepared call for inputs like ``x``, where one can be made now
    (else the layer keeps the general path; a later call tries again)."""
    if torch.compiler.is_compiling():
        return  # no state made or dropped in a trace
    if state.prepared is not None:
        _generation[0] += 1
    state.prepared = None
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # nothing allocated into a graph's private memory
    kernel = state.kernels.get(x.device)
    weight = layer.weight
    prepare = getattr(kernel, "prepare", None)
    if prepare is None or weight is None or weight.device != x.device:
        return
    parameters = layer._parameters
    if parameters.get("weight") is not weight or bias is not getattr(layer, "bias", None):
        return  # tensors the prepared call could not find again the way it checks them
    if any(parameters.get(name) is not getattr(layer, name, None) for name in _HELD):
        return
    scale = state.current_weight_scale(layer)
    product = prepare(scale, layer.input_scale, state.layer_config.weight_quant_key.group_shape, state.activation,
                      bias, x)  # fmt: skip
    if product is not None:
        state.prepared = PreparedCall(state, kernel, product, weight, scale, layer.input_scale, bias, x)


__all__ = ["ColdLaunch", "PreparedCall", "Product", "general_product", "generation", "prepare_call", "serve_prepared"]
