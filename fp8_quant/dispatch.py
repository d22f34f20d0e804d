"""The one place where a layer's recipe is decided: fp8 method (or none) and the reason, per layer name.

Like vLLM's ``get_quant_method(layer, prefix)``: the checkpoint loader of the ComfyUI nodes and the bridge that
patches built models both ask ``Fp8Recipe.decide`` for every linear, with the layer's name and its weight as it
arrives (fp8 from a file, or high precision), and do what it says. Rules that live here and nowhere else:

- an fp8 weight runs on the stored-weight method, whose scheme is the file's with the user's activation choices
  (``config.resolve``); a layer the user asked to skip is kept in high precision instead (the loader
  dequantizes it);
- a static scheme takes the layer's ``input_scale`` from its file, and a layer without one learns its scale at
  run time (``auto_scales``), said in the reason; under ``auto`` (``calibrated``) a layer with an ``input_scale``
  runs static on it, the others are calibrated at run time (a file where only some layers carry one);
- a high-precision weight is quantized on the fly where there is an online config and no skip pattern matches;
- an int8 weight (ComfyUI's ``int8_tensorwise``) runs on the stored-int8 method with its file's ConvRot group,
  activations rounded per row at every call (weight-only where the user asked for no activation scheme); a file
  with int8 layers is pre-quantized: its high-precision layers stay as they are;
- a high-precision weight is quantized on the fly to int8 rotated instead of fp8 where the online config is an
  ``Int8Config``;
- per-layer overrides computed for one model (a sensitivity pass keeps some layers in high precision, or gives a
  layer another scheme) win over the patterns, and weights rounded ahead of time (``gptq``) replace plain rounding.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

import torch

from .choices import ActivationScheme
from .config import Fp8Config, Int8Config, UserOptions, matching_pattern, resolve
from .format_choice import resolve_quant_format
from .fp8_utils import HIGH_PRECISION_DTYPES, is_fp8_dtype
from .kernels import kernel_class
from .methods import Fp8LinearMethod, Fp8OnlineLinearMethod, RoundedWeights
from .methods_int8 import Int8LinearMethod, Int8OnlineLinearMethod
from .scheme import PER_TENSOR

QUANTIZED = "quantized"
STORED_FP8 = "fp8 in file"
UNIT_SCALE_FP8 = "fp8 weight used as it is (unit scale)"
STATIC_WITHOUT_INPUT_SCALE = "fp8 in file, static scale learnt at run time (no input_scale)"
STORED_WITH_INPUT_SCALE = "fp8 in file, with its input scale"
STORED_INT8 = "int8 in file"
STORED_INT8_ROTATED = "int8 rotated in file"
LinearMethod = Fp8LinearMethod | Int8LinearMethod


@dataclass(frozen=True)
class LayerDecision:
    """``method`` ``None`` keeps the layer in high precision (an fp8 weight is then dequantized by the caller)."""

    name: str
    method: LinearMethod | None
    reason: str
    keep_dtype: torch.dtype | None = None  # a layer kept in high precision is stored in this dtype where wider
    stored_rotation: int | None = None  # a kept int8 layer's ConvRot group, to turn its weight back into values

    @property
    def quantized(self) -> bool:
        return self.method is not None


@dataclass(frozen=True)
class LayerOverride:
    """One layer's choice, computed for one model: ``keep`` it in high precision (``reason`` says why), or
    quantize it with ``config`` instead of the recipe's online config."""

    keep: bool = False
    reason: str = ""
    config: Fp8Config | Int8Config | None = None


@dataclass
class Fp8Recipe:
    """Every per-layer choice for one model.

    ``stored``: the scheme of weights that arrive in fp8; ``online``: how high-precision weights are quantized
    (``None`` keeps them); ``ignored_layers``: patterns that keep even an fp8 weight in high precision (the user's
    own, never the default sensitive-layer list: a file's author chose what to quantize); ``kernel``: a forced
    kernel name, or ``None`` to choose per device. ``overrides``: per-layer choices by exact name (they win over
    the patterns); ``rounded``: fp8 weights chosen ahead of time per layer (error-compensating rounding), used in
    place of plain rounding; ``keep_dtype``: where set, layers kept in high precision are stored in it when their
    weight is wider (an fp32 model's kept layers in bf16). ``int8_layers``: a file's ``int8_tensorwise`` layers by
    model name, with their ConvRot group (``None``: not rotated).
    """

    stored: Fp8Config = field(default_factory=lambda: Fp8Config(weight_granularity=PER_TENSOR))
    online: Fp8Config | Int8Config | None = None
    ignored_layers: tuple[str, ...] = ()
    kernel: str | None = None
    overrides: dict[str, LayerOverride] = field(default_factory=dict)
    rounded: RoundedWeights = field(default_factory=dict)
    keep_dtype: torch.dtype | None = None
    int8_layers: dict[str, int | None] = field(default_factory=dict)
    format_note: str | None = None
    _methods: dict[tuple[Fp8Config | Int8Config, bool], LinearMethod] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.kernel is not None:
            kernel_class(self.kernel)  # an unknown name is an error naming the option, now, not at first forward

    @classmethod
    def for_checkpoint(
        cls,
        file_config: Fp8Config | None,
        options: UserOptions,
        kernel: str | None = None,
        int8_layers: dict[str, int | None] | None = None,
        device: torch.device | None = None,
    ) -> Fp8Recipe:
        """A file's layers: fp8 ones on the file's scheme, int8 ones (``int8_layers``, see the class) on theirs,
        high-precision ones quantized on the fly only when the file holds no fp8 or int8 layer at all (a mixed
        file's bf16 layers were kept on purpose). ``quant_format`` auto is resolved for ``device`` there, for the
        layers quantized on the fly only (``format_choice``; its sentence is ``format_note``): a file's own 8-bit
        layers keep their format and their activations' scheme."""
        kernel = None if kernel in (None, "auto") else kernel
        int8_layers = dict(int8_layers or {})
        common = {"ignored_layers": options.skip_layers, "kernel": kernel, "int8_layers": int8_layers}
        if file_config is None and not int8_layers:
            note = None
            if device is not None:
                options, note = resolve_quant_format(options, device, kernel)
            return cls(online=resolve(options), format_note=note, **common)
        stored = resolve(options, file_config or Fp8Config(weight_granularity=PER_TENSOR))
        return cls(stored=stored, **common)

    @classmethod
    def for_model(cls, config: Fp8Config | Int8Config, kernel: str | None = None, **per_model) -> Fp8Recipe:
        """A built model (the bridge): its high-precision linears quantized by ``config`` (fp8, or int8 rotated);
        fp8 weights it already holds (a plain fp8 cast) used as they are at unit scale unless
        ``config.ignored_layers`` skips them. ``per_model``: ``overrides``, ``rounded``, ``keep_dtype`` (see the
        class)."""
        if isinstance(config, Int8Config):
            stored = Fp8Config(weight_granularity=PER_TENSOR, ignored_layers=config.ignored_layers)
        else:
            stored = replace(config, weight_granularity=PER_TENSOR)
        return cls(stored=stored, online=config, ignored_layers=config.ignored_layers, kernel=kernel, **per_model)

    @property
    def config(self) -> Fp8Config | Int8Config:
        """The config a report describes: the online one where there is one, the int8 one of a file whose
        quantized layers are all int8."""
        if self.online is None and self.int8_layers and not any(
            isinstance(key[0], Fp8Config) for key in self._methods
        ):
            groups = Counter(self.int8_layers.values()).most_common(1)
            return self._stored_int8_config(groups[0][0])
        return self.online or self.stored

    def decide(
        self,
        name: str,
        weight: torch.Tensor | None,
        *,
        has_input_scale: bool = False,
        unit_scale: bool = False,
    ) -> LayerDecision:
        """The recipe for linear ``name`` whose weight arrives as ``weight``.

        ``has_input_scale``: the file brings a calibrated input scale for it; ``unit_scale``: an fp8 weight comes
        with no scale at all (a plain cast held by a built model).
        """
        if weight is None or weight.device.type == "meta":
            return LayerDecision(name, None, "no materialised weight")
        if is_fp8_dtype(weight.dtype):
            return self._decide_stored(name, has_input_scale, unit_scale)
        if weight.dtype == torch.int8 and (self.int8_layers or self.online is None):
            return self._decide_int8(name)
        if self.online is None:
            return LayerDecision(name, None, f"{weight.dtype} in file")
        override = self.overrides.get(name, LayerOverride())
        if override.keep:
            return LayerDecision(name, None, override.reason or "kept in high precision", self.keep_dtype)
        pattern = matching_pattern(name, self.online.ignored_layers)
        if pattern is not None:
            return LayerDecision(name, None, f"matched {pattern!r}", self.keep_dtype)
        if weight.dtype not in HIGH_PRECISION_DTYPES or weight.dim() != 2 or weight.numel() == 0:
            return LayerDecision(name, None, f"unsupported weight {weight.dtype} {tuple(weight.shape)}")
        return LayerDecision(name, self._method(override.config or self.online, online=True), QUANTIZED)

    def _decide_int8(self, name: str) -> LayerDecision:
        """A stored int8 layer: the int8 method with the file's rotation, or kept (dequantized by the caller)."""
        if name not in self.int8_layers:
            raise ValueError(
                f"{name}: int8 weight without an int8_tensorwise format entry in its file (this pack reads int8 "
                "weights as ComfyUI's int8_tensorwise layers only)"
            )
        group = self.int8_layers[name]
        pattern = matching_pattern(name, self.ignored_layers)
        if pattern is not None:
            return LayerDecision(name, None, f"matched {pattern!r}", stored_rotation=group)
        reason = STORED_INT8_ROTATED if group is not None else STORED_INT8
        return LayerDecision(name, self._method(self._stored_int8_config(group), online=False), reason)

    def _stored_int8_config(self, group: int | None) -> Int8Config:
        """How a file's int8 layers run: the file's rotation; activations rounded per row unless the user asked for
        none (weight-only)."""
        scheme = ActivationScheme.DYNAMIC if self.stored.quantizes_activations else ActivationScheme.NONE
        return Int8Config(rotation_group=group, activation_scheme=scheme, output_dtype=self.stored.output_dtype)

    def _decide_stored(self, name: str, has_input_scale: bool, unit_scale: bool) -> LayerDecision:
        pattern = matching_pattern(name, self.ignored_layers)
        if pattern is not None:
            return LayerDecision(name, None, f"matched {pattern!r}")
        reason = UNIT_SCALE_FP8 if unit_scale else STORED_FP8
        config = self.stored
        if config.activation_scheme is ActivationScheme.STATIC and not has_input_scale:
            reason = STATIC_WITHOUT_INPUT_SCALE
        elif config.activation_scheme is ActivationScheme.CALIBRATED and has_input_scale:
            # auto on a file where only some layers carry a calibrated input scale (``convert --calibrated`` from a
            # partial run): those layers use theirs, the others are calibrated at run time.
            config = replace(config, activation_scheme=ActivationScheme.STATIC, activation_granularity=PER_TENSOR)
            reason = STORED_WITH_INPUT_SCALE
        return LayerDecision(name, self._method(config, online=False), reason)

    def methods(self) -> list[LinearMethod]:
        """The methods this recipe has handed out so far (one per scheme)."""
        return list(self._methods.values())

    def _method(self, config: Fp8Config | Int8Config, online: bool) -> LinearMethod:
        """One method object per scheme, shared by the layers that use it."""
        method = self._methods.get((config, online))
        if method is None:
            if isinstance(config, Int8Config):
                if online:
                    method = Int8OnlineLinearMethod(config, self.kernel, self.rounded)
                else:
                    method = Int8LinearMethod(config, self.kernel)
            elif online:
                method = Fp8OnlineLinearMethod(config, self.kernel, self.rounded)
            else:
                method = Fp8LinearMethod(config, self.kernel)
            self._methods[(config, online)] = method
        return method
