"""Fp8Config: what to quantize and how, as plain validated data; and how a user's choices merge into it.

A config is built from a dict (node options, a checkpoint's header, a JSON file) and every unknown value is a
``ValueError`` that names the field and the allowed values, so a typo in a workflow never becomes a silent
default. ``UserOptions`` holds what a person chose by the names they see (node widgets, CLI flags, with
``auto`` meaning "the file's own or the default"); ``resolve`` is the one place where those choices meet a file's
config and a context's ``Defaults`` (the text encoders' recipes are a table of them). Names are parsed by the one
table of ``choices``; a config holds typed values (``ActivationScheme``, ``GroupShape``, dtypes).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from .choices import (
    ACTIVATION_GRANULARITY,
    ACTIVATION_SCHEME,
    AUTO,
    INT8_ACTIVATION_GRANULARITY,
    INT8_ACTIVATION_SCHEME,
    INT8_WEIGHT_GRANULARITY,
    OUTPUT_DTYPE,
    QUANT_FORMAT,
    USER_ACTIVATION_GRANULARITIES,
    USER_ACTIVATION_SCHEMES,
    WEIGHT_DTYPE,
    WEIGHT_GRANULARITIES,
    WEIGHT_GRANULARITY,
    WEIGHT_GRANULARITY_OR_AUTO,
    ActivationScheme,
    Int8ActivationScales,
    QuantFormat,
)
from .patterns import MAX_PATTERN_CHARS, PatternError, compile_regex
from .scheme import (
    PER_CHANNEL,
    PER_TENSOR,
    PER_TOKEN,
    GroupShape,
    QuantKey,
    activation_key,
    weight_key,
)

# Name -> value views of the parse table (``choices``), for callers that list or look up names.
WEIGHT_DTYPES: dict[str, torch.dtype] = dict(WEIGHT_DTYPE.values)
OUTPUT_DTYPES: dict[str, torch.dtype | None] = dict(OUTPUT_DTYPE.values)
WEIGHT_GROUPS: dict[str, GroupShape] = dict(WEIGHT_GRANULARITY.values)
ACTIVATION_GROUPS: dict[str, GroupShape] = dict(ACTIVATION_GRANULARITY.values)
ACTIVATION_SCHEMES = ACTIVATION_SCHEME.names
ACTIVATION_GRANULARITIES = ACTIVATION_GRANULARITY.names

# Layers that DiTs and text encoders keep in high precision: quantizing them costs much quality for few bytes.
SENSITIVE_LAYER_PATTERNS: tuple[str, ...] = (
    "*embed*",
    "*norm*",
    "*modulation*",
    "*adaLN*",
    "*adaln*",
    "*head*",
    "*final_layer*",
    "*proj_out",
    "*time_in*",
    "*time_text_embed*",
    "*timestep*",
    "*guidance_in*",
    "*vector_in*",
    "*img_in",
    "*txt_in",
    "*patchify*",
    "*lm_head*",
    "*shared*",
    "*relative_attention_bias*",
    "*text_projection*",
)


def parse_quant_format(value: Any, option: str = "quant_format") -> QuantFormat:
    """``auto``, ``fp8`` or ``int8_rotated`` (also ``int8``), case-insensitive; anything else is an error naming
    ``option``."""
    if isinstance(value, QuantFormat):
        return value
    return QUANT_FORMAT.parse(str(value).strip().lower().replace("-", "_").replace(" ", "_"), option, shown=value)


@dataclass(frozen=True)
class Fp8Config:
    """How the linears of one model are quantized, as typed values (names are parsed by ``choices``).

    ``weight_granularity``: ``PER_CHANNEL``, ``PER_TENSOR``, ``BLOCK_128``, or ``None`` for "auto" (per layer: per
    tensor where the rows share a range, fitted scales where a few input columns dominate). ``activation_scheme``:
    an ``ActivationScheme`` (dynamic, static, calibrated, none). ``activation_granularity`` is that of dynamic
    scales (``PER_TOKEN_GROUP_128``: one per token and 128 inputs). ``output_dtype`` ``None`` means "the input's
    dtype". ``round_activations_on_dequant``: where the product runs in high precision (the dequantize kernel:
    CPUs, GPUs without FP8 tensor cores, odd shapes), also round the activations to fp8 as the fp8 product would
    (see ``resolve`` for when). Names are accepted for every field and parsed once, here.
    """

    weight_dtype: torch.dtype = torch.float8_e4m3fn
    weight_granularity: GroupShape | None = PER_CHANNEL
    activation_scheme: ActivationScheme = ActivationScheme.DYNAMIC
    activation_granularity: GroupShape = PER_TOKEN
    ignored_layers: tuple[str, ...] = ()
    output_dtype: torch.dtype | None = None
    round_activations_on_dequant: bool = False

    quant_format = QuantFormat.FP8  # not a field: what every config of this class is

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight_dtype", WEIGHT_DTYPE.parse(self.weight_dtype))
        object.__setattr__(self, "weight_granularity", WEIGHT_GRANULARITY_OR_AUTO.parse(self.weight_granularity))
        object.__setattr__(self, "activation_scheme", ACTIVATION_SCHEME.parse(self.activation_scheme))
        object.__setattr__(self, "activation_granularity", ACTIVATION_GRANULARITY.parse(self.activation_granularity))
        object.__setattr__(self, "output_dtype", OUTPUT_DTYPE.parse(self.output_dtype))
        if self.activation_scheme is ActivationScheme.STATIC and self.activation_granularity != PER_TENSOR:
            raise ValueError(
                "activation_granularity: a static activation scale is one calibrated scalar, so it must be "
                f"'tensor' (got {self._names()['activation_granularity']!r}); use activation_scheme='dynamic' for "
                "per-token scales"
            )
        object.__setattr__(self, "ignored_layers", check_patterns("ignored_layers", self.ignored_layers))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Fp8Config:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown Fp8Config field(s) {unknown}; allowed fields: {sorted(known)}")
        kwargs: dict[str, Any] = dict(values)
        if "weight_dtype" in kwargs:
            kwargs["weight_dtype"] = parse_weight_dtype(kwargs["weight_dtype"])
        if "output_dtype" in kwargs:
            kwargs["output_dtype"] = parse_output_dtype(kwargs["output_dtype"])
        for name in ("weight_granularity", "activation_scheme", "activation_granularity"):
            if name in kwargs and isinstance(kwargs[name], str):
                kwargs[name] = kwargs[name].lower()
        if "ignored_layers" in kwargs:
            kwargs["ignored_layers"] = parse_patterns(kwargs["ignored_layers"])
        return cls(**kwargs)

    def _names(self) -> dict[str, str]:
        """The choices by name, as files, widgets and messages write them."""
        return {
            "weight_dtype": WEIGHT_DTYPE.format(self.weight_dtype),
            "weight_granularity": WEIGHT_GRANULARITY_OR_AUTO.format(self.weight_granularity),
            "activation_scheme": ACTIVATION_SCHEME.format(self.activation_scheme),
            "activation_granularity": ACTIVATION_GRANULARITY.format(self.activation_granularity),
            "output_dtype": OUTPUT_DTYPE.format(self.output_dtype),
        }

    def to_dict(self) -> dict[str, Any]:
        names = self._names()
        return {
            "weight_dtype": names["weight_dtype"],
            "weight_granularity": names["weight_granularity"],
            "activation_scheme": names["activation_scheme"],
            "activation_granularity": names["activation_granularity"],
            "ignored_layers": list(self.ignored_layers),
            "output_dtype": names["output_dtype"],
            "round_activations_on_dequant": self.round_activations_on_dequant,
        }

    def __repr__(self) -> str:
        """By the choices' names (stable across versions: the text encoders' fit cache keys on it)."""
        names = self._names()
        return (
            f"Fp8Config(weight_dtype={self.weight_dtype}, weight_granularity={names['weight_granularity']!r}, "
            f"activation_scheme={names['activation_scheme']!r}, "
            f"activation_granularity={names['activation_granularity']!r}, ignored_layers={self.ignored_layers!r}, "
            f"output_dtype={self.output_dtype}, round_activations_on_dequant={self.round_activations_on_dequant})"
        )

    def with_ignored(self, patterns: Iterable[str]) -> Fp8Config:
        return replace(self, ignored_layers=tuple(self.ignored_layers) + tuple(patterns))

    @property
    def quantizes_activations(self) -> bool:
        return self.activation_scheme.quantizes

    @property
    def learns_activation_scales(self) -> bool:
        """Scales found while the model runs (where a layer has no ``input_scale`` from its file)."""
        return self.activation_scheme.learns_scales

    @property
    def weight_group(self) -> GroupShape:
        """The configured weight granularity; "auto" is decided per layer (the fallback here is per channel)."""
        return self.weight_granularity if self.weight_granularity is not None else PER_CHANNEL

    @property
    def activation_group(self) -> GroupShape:
        return self.activation_granularity

    @property
    def weight_quant_key(self) -> QuantKey:
        return weight_key(self.weight_dtype, self.weight_group)

    @property
    def activation_quant_key(self) -> QuantKey | None:
        """The activation scheme; activations use e4m3fn whatever the weights use (e5m2 x e5m2 has no kernel)."""
        if not self.quantizes_activations:
            return None
        return activation_key(torch.float8_e4m3fn, self.activation_scheme is ActivationScheme.STATIC,
                              self.activation_group)  # fmt: skip

    def describe(self, activations_rounded: bool = True, weights: str | None = None) -> str:
        """The scheme in words; ``activations_rounded`` ``False``: the kernel that runs keeps activations in high
        precision (the dequantize kernel), so no activation is rounded or calibrated, whatever the scheme says.
        ``weights``: the weights as the layers run them, where the report knows better than the config."""
        weights = weights or str(self.weight_quant_key)
        if self.weight_granularity is None:
            weights = weights.replace("per-channel", "per-tensor, per-channel or fitted groups by layer")
        if self.quantizes_activations and not activations_rounded:
            acts = "not rounded (this device multiplies dequantized weights)"
        elif self.activation_scheme is ActivationScheme.CALIBRATED:
            acts = "calibrated by layer at the first step"
        else:
            acts = str(self.activation_quant_key) if self.activation_quant_key else "none (weight-only)"
        return f"weights {weights}; activations {acts}"


INT8_WEIGHT_GRANULARITIES = INT8_WEIGHT_GRANULARITY.names
INT8_ACTIVATION_SCHEMES = INT8_ACTIVATION_SCHEME.names
INT8_ACTIVATION_GRANULARITIES = INT8_ACTIVATION_GRANULARITY.names


@dataclass(frozen=True)
class Int8Config:
    """How int8 linears run: ComfyUI 0.30's ``int8_tensorwise`` scheme, with or without its ConvRot rotation.

    ``rotation_group``: the inputs of each row are rotated in groups of this many (a power of 4; ComfyUI's
    ``convrot_groupsize``, 256 by default) before rounding, weights once and activations at every call; ``None``:
    no rotation. On the fly, a layer whose width the group does not divide takes the largest power-of-4 group that
    does (at least 16), or none. ``weight_granularity``: one scale per output channel or per tensor.
    ``activation_scheme``: ``dynamic`` rounds activations to int8 with one scale per row at every call (the int8
    GEMM); ``none`` keeps them in high precision against the dequantized weight (weight-only).
    ``activation_granularity``: ``token`` (one scale per row) or ``group``: one scale per row and rotation group,
    and the weights one per output channel and rotation group (``weight_granularity`` channel, rotated layers only).
    """

    rotation_group: int | None = 256
    weight_granularity: GroupShape = PER_CHANNEL
    activation_scheme: ActivationScheme = ActivationScheme.DYNAMIC
    ignored_layers: tuple[str, ...] = ()
    output_dtype: torch.dtype | None = None
    activation_granularity: Int8ActivationScales = Int8ActivationScales.TOKEN

    def __post_init__(self) -> None:
        if self.rotation_group is not None:
            from .rotation import check_group_size  # config stays importable without the math modules

            check_group_size(self.rotation_group, what="rotation_group")
        # Names (widgets, files, the CLI) or typed values in; typed values from here on.
        object.__setattr__(self, "weight_granularity", INT8_WEIGHT_GRANULARITY.parse(self.weight_granularity))
        object.__setattr__(self, "activation_scheme", INT8_ACTIVATION_SCHEME.parse(self.activation_scheme))
        granularity = INT8_ACTIVATION_GRANULARITY.parse(self.activation_granularity)
        object.__setattr__(self, "activation_granularity", granularity)
        if self.grouped_scales and (not self.per_channel or not self.quantizes_activations):
            raise ValueError(
                "activation_granularity: 'group' with quant_format int8_rotated gives the weights one scale per "
                "output channel and group and rounds the activations: it cannot go with weight_granularity 'tensor' "
                "or activation_scheme 'none'"
            )
        _check_choice("output_dtype", self.output_dtype, tuple(OUTPUT_DTYPES.values()))
        object.__setattr__(self, "ignored_layers", check_patterns("ignored_layers", self.ignored_layers))

    quant_format = QuantFormat.INT8_ROTATED  # not a field

    @property
    def quantizes_activations(self) -> bool:
        return self.activation_scheme.quantizes

    @property
    def learns_activation_scales(self) -> bool:
        return False

    @property
    def grouped_scales(self) -> bool:
        """One scale per row (and output channel) and rotation group, on rotated layers."""
        return self.activation_granularity is Int8ActivationScales.GROUP

    @property
    def per_channel(self) -> bool:
        return self.weight_granularity == PER_CHANNEL

    @property
    def weight_group(self) -> GroupShape:
        return self.weight_granularity

    @property
    def weight_dtype(self) -> torch.dtype:
        return torch.int8

    def rotation_words(self) -> str:
        return f"rotated in groups of {self.rotation_group}" if self.rotation_group else "not rotated"

    def describe(self, activations_rounded: bool = True, weights: str | None = None) -> str:
        per = " and rotation group" if self.grouped_scales else ""
        weights = f"int8, per-{INT8_WEIGHT_GRANULARITY.format(self.weight_granularity)}{per}, {self.rotation_words()}"
        acts = f"int8, per-token{per}, dynamic" if self.quantizes_activations else "none (weight-only)"
        return f"weights {weights}; activations {acts}"




@dataclass(frozen=True)
class UserOptions:
    """A person's choices, by the names the node and the CLI show (so errors name what the user typed).

    ``auto`` keeps the file's own scheme for fp8 files with calibrated input scales and otherwise calibrates per
    layer at run time (static per-tensor where the activations allow, dynamic per-token where they have outlier
    tokens); weights quantized on the fly get per-tensor or per-channel scales, per layer. ``skip_layers`` are
    extra layers to keep in high precision, on top of the sensitive layers that on-the-fly quantization always
    keeps. ``quant_format``: the number format of layers quantized on the fly, ``fp8`` or ``int8_rotated``
    (ComfyUI's INT8-ConvRot scheme; a file's own layers keep the file's format), or ``auto``: the GPU's faster
    one (``format_choice``; fp8 until a device resolves it).
    """

    activation_scheme: str = AUTO
    activation_granularity: str = AUTO
    weight_granularity: str = AUTO
    skip_layers: tuple[str, ...] = ()
    quant_format: str = QuantFormat.FP8.value

    def __post_init__(self) -> None:
        _check_choice("activation_scheme", self.activation_scheme, USER_ACTIVATION_SCHEMES)
        _check_choice("activation_granularity", self.activation_granularity, USER_ACTIVATION_GRANULARITIES)
        _check_choice("weight_granularity", self.weight_granularity, WEIGHT_GRANULARITIES)
        object.__setattr__(self, "quant_format", parse_quant_format(self.quant_format).value)
        object.__setattr__(self, "skip_layers", check_patterns("skip_layers", parse_patterns(self.skip_layers)))

    @property
    def format(self) -> QuantFormat:
        return QuantFormat(self.quant_format)


@dataclass(frozen=True)
class Defaults:
    """What ``auto`` stands for in one context (the DiT loaders, each text-encoder recipe): the activation scheme
    and the weight granularity where neither the user nor the file chose one (``None``: per layer);
    ``round_whenever_quantized``: the dequantize kernel rounds activations wherever the scheme quantizes them (the
    reported error is the FP8 GPU's), else only where the user chose a scheme explicitly; ``int8_weight_only``:
    weight-only layers are int8 (per channel or per tensor, not rotated) rather than fp8."""

    activation_scheme: ActivationScheme = ActivationScheme.CALIBRATED
    weight_granularity: GroupShape | None = None
    round_whenever_quantized: bool = False
    int8_weight_only: bool = False


# Models quantized on the fly or loaded from a file (Load FP8 DiT, the CLI): activations calibrated per layer at the
# first step, weights per layer; the dequantize kernel rounds activations only where a scheme was chosen explicitly
# (to reproduce an FP8 GPU's numbers), since it only adds error there. The text encoders' table is in text_encoder.
DIT_DEFAULTS = Defaults()


def resolve(
    options: UserOptions, file_config: Fp8Config | None = None, defaults: Defaults = DIT_DEFAULTS
) -> Fp8Config | Int8Config:
    """The one place where a person's choices meet a file's config and the context's defaults.

    ``file_config``: the config of a file's fp8 layers; then the weights are the file's (each layer's scale shape
    decides; ``weight_granularity`` only applies on the fly) and ``auto`` keeps the file's calibrated input scales
    where it has them. Without one, the model is quantized on the fly: the user's choices, else ``defaults``, with
    the sensitive layers and the user's ``skip_layers`` kept; ``quant_format`` int8_rotated gives the int8 scheme.
    ``activation_granularity`` ``auto``: one scale per token when it is computed per call, one per tensor when it
    is calibrated (static).
    """
    if file_config is None and options.format is QuantFormat.INT8_ROTATED:
        return int8_online_config(options)
    chosen = options.activation_scheme != AUTO
    if chosen:
        scheme = ACTIVATION_SCHEME.parse(options.activation_scheme)
    elif file_config is not None and file_config.activation_scheme is ActivationScheme.STATIC:
        scheme = ActivationScheme.STATIC
    else:
        scheme = defaults.activation_scheme
    if options.activation_granularity != AUTO:
        granularity = ACTIVATION_GRANULARITY.parse(options.activation_granularity)
    else:
        granularity = PER_TENSOR if scheme is ActivationScheme.STATIC else PER_TOKEN
    rounds = scheme.quantizes if defaults.round_whenever_quantized else chosen
    activations = {"activation_scheme": scheme, "activation_granularity": granularity}
    if file_config is not None:
        return replace(file_config, **activations, round_activations_on_dequant=rounds)
    weights = WEIGHT_GRANULARITY_OR_AUTO.parse(options.weight_granularity)
    weights = defaults.weight_granularity if weights is None else weights
    skips = SENSITIVE_LAYER_PATTERNS + options.skip_layers
    if defaults.int8_weight_only and not scheme.quantizes and weights in (None, PER_CHANNEL, PER_TENSOR):
        return Int8Config(rotation_group=None, weight_granularity=PER_TENSOR if weights == PER_TENSOR else PER_CHANNEL,
                          activation_scheme=ActivationScheme.NONE, ignored_layers=skips)  # fmt: skip
    return Fp8Config(
        weight_granularity=weights, **activations, ignored_layers=skips, round_activations_on_dequant=rounds
    )


def online_config(options: UserOptions) -> Fp8Config | Int8Config:
    """How a bf16/fp16/fp32 model is quantized on the fly (``resolve`` without a file)."""
    return resolve(options)


def int8_online_config(options: UserOptions) -> Int8Config:
    """The int8 rotated scheme with the user's choices that have an int8 meaning; the others are errors naming them
    (int8 activations are rounded per row at every call, or not at all)."""
    if options.activation_scheme not in (AUTO, "dynamic", "none"):
        raise ValueError(
            f"activation_scheme: {options.activation_scheme!r} has no int8 form; with quant_format int8_rotated "
            "activations are rounded per row at every call ('dynamic', the default) or not at all ('none')"
        )
    if options.activation_granularity not in (AUTO, *INT8_ACTIVATION_GRANULARITIES):
        raise ValueError(
            f"activation_granularity: {options.activation_granularity!r} has no int8 form; int8 activations have "
            "one scale per token ('token', the default) or per token and rotation group ('group')"
        )
    if options.weight_granularity not in (AUTO, *INT8_WEIGHT_GRANULARITIES):
        raise ValueError(
            f"weight_granularity: {options.weight_granularity!r} has no int8 form; allowed with quant_format "
            f"int8_rotated: {[AUTO, *INT8_WEIGHT_GRANULARITIES]}"
        )
    named = {"weight_granularity": options.weight_granularity, "activation_scheme": options.activation_scheme,
             "activation_granularity": options.activation_granularity}  # fmt: skip
    return Int8Config(
        ignored_layers=SENSITIVE_LAYER_PATTERNS + options.skip_layers,
        **{name: value for name, value in named.items() if value != AUTO},  # auto: the config's defaults
    )


def stored_config(file_config: Fp8Config, options: UserOptions) -> Fp8Config:
    """How the fp8 layers of a file run: the file's own config, with the user's activation choices on top
    (``resolve`` with the file's config)."""
    config = resolve(options, file_config)
    assert isinstance(config, Fp8Config)
    return config


def is_layer_skipped(name: str, config_or_patterns: Fp8Config | Iterable[str]) -> bool:
    """Whether layer ``name`` stays in high precision.

    A pattern matches by exact name, by dotted prefix (``blocks.0`` covers ``blocks.0.attn.q``), by glob
    (``*norm*``, ``blocks.*.ffn.2``) or by regex when written ``re:<expr>`` (searched, not anchored). Every kind
    matches in time linear in the name: regexes run on ``patterns.LinearRegex`` (no backtracking), globs on
    ``fnmatch``, whose translation has no backtracking blow-up either (atomic groups).
    """
    patterns = config_or_patterns.ignored_layers if isinstance(config_or_patterns, Fp8Config) else config_or_patterns
    return matching_pattern(name, patterns) is not None


def matching_pattern(name: str, patterns: Iterable[str]) -> str | None:
    """The first pattern that skips ``name`` (see ``is_layer_skipped``), for reports that say why."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if compile_regex(pattern[3:]).search(name):
                return pattern
        elif name == pattern or name.startswith(pattern + "."):
            return pattern
        elif any(ch in pattern for ch in "*?[") and fnmatch.fnmatchcase(name, pattern):
            return pattern
    return None


def parse_weight_dtype(value: Any) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    return WEIGHT_DTYPE.parse(str(value).lower().removeprefix("torch."), shown=value)


def parse_output_dtype(value: Any) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    return OUTPUT_DTYPE.parse(str(value).lower().removeprefix("torch."), shown=value)


def parse_patterns(value: Any) -> tuple[str, ...]:
    """Layer patterns from text ("head, *norm*", one per line too) or from a list of strings."""
    if isinstance(value, str):
        return tuple(p.strip() for p in re.split(r"[,\n]", value) if p.strip())
    return tuple(value)


def check_patterns(option: str, patterns: Any) -> tuple[str, ...]:
    """Patterns as a tuple of strings, each ``re:`` regex compiled once (and refused where it would need
    backtracking, see ``patterns``); errors name ``option`` as the user wrote it (``skip_layers`` on a node,
    ``--skip`` on the command line, ``ignored_layers`` in a config)."""
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"{option}: expected a list of layer names or patterns (strings)")
    for pattern in patterns:
        if len(pattern) > MAX_PATTERN_CHARS + 3:
            raise ValueError(f"{option}: pattern {pattern[:40]!r}... is longer than {MAX_PATTERN_CHARS} characters")
        if pattern.startswith("re:"):
            try:
                compile_regex(pattern[3:])
            except PatternError as error:
                raise ValueError(f"{option}: invalid regex {pattern!r}: {error}") from None
    return tuple(patterns)


def unmatched_patterns(patterns: Iterable[str], names: Iterable[str]) -> list[str]:
    """The patterns that match none of ``names``: a typo in a skip pattern would otherwise go unnoticed."""
    names = list(names)
    return [pattern for pattern in patterns if not any(matching_pattern(name, (pattern,)) for name in names)]


def _check_choice(field_name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        shown = [str(a).removeprefix("torch.") if a is not None else "auto" for a in allowed]
        raise ValueError(f"{field_name}: {value!r} is not allowed; allowed values: {shown}")


__all__ = [
    "SENSITIVE_LAYER_PATTERNS",
    "Defaults",
    "Fp8Config",
    "Int8Config",
    "QuantFormat",
    "UserOptions",
    "is_layer_skipped",
    "matching_pattern",
    "online_config",
    "parse_output_dtype",
    "parse_patterns",
    "parse_quant_format",
    "parse_weight_dtype",
    "resolve",
    "stored_config",
    "unmatched_patterns",
]
