"""Text encoders: the most accurate fp8 copy at about half the memory (``quality``), or a fast one (``speed``).

A text encoder runs once per prompt and its error reaches every sampling step, so the default is fitted to the
encoder on sample inputs (the caller's, or ``prompts.CALIBRATION_PROMPTS`` encoded by the encoder itself):

1. reference outputs and each linear's input statistics ``X^T X`` (``calibration``);
2. each weight rounded to fp8 by error-compensating rounding on those statistics (``gptq``), per-channel scales;
3. each layer's effect on the outputs alone in fp8 (``sensitivity``); the worst kept in bf16 while the linear
   weights stay within ``budget`` times their bf16 bytes;
4. the model quantized by one ``Fp8Recipe`` carrying those per-layer choices (``bridge``).

``quality`` keeps activations in high precision (on a real sentence encoder, quantizing activations costs more
accuracy than anything else), and then the weights are int8 with a scale per output channel: both 8-bit formats
are turned back into the compute dtype at every call, and int8's evenly spaced grid rounds a row of weights about
2.4 times finer than e4m3's 3 mantissa bits (``tests/test_text_encoder_real.py`` measures both on held-out
sentences). ``speed`` quantizes them per token for the fp8 tensor cores
(fp8 x fp8), with the same rounding and kept layers. ``plain`` skips the fitting: per-channel scales, nothing
measured, the fastest to prepare.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import nn

from . import gptq
from .block_replay import BlockReplay
from .bridge import ForwardInstaller, ProgressCallback, prepare_model_for_fp8
from .calibration import Forward, Sample, call_model, input_hessians, output_error, run_samples
from .choices import ActivationScheme
from .config import Defaults, Fp8Config, Int8Config, QuantFormat, UserOptions, resolve
from .dispatch import Fp8Recipe, LayerOverride
from .fit_cache import FitCache, FittedResult, fit_key
from .fp8_utils import is_fp8_dtype, quantize_weight
from .layer_state import is_fp8_layer
from .methods import Fp8OnlineLinearMethod, RoundedWeights
from .methods_int8 import Int8OnlineLinearMethod
from .prompts import SENSITIVITY_PROMPTS
from .quant_int8 import quantize_int8_weight
from .report import Fp8Report, mib
from .scheme import PER_CHANNEL
from .sensitivity import SensitivityReport, choose_kept, fake_fp8, measure_sensitivity

logger = logging.getLogger(__name__)

# What ``auto`` stands for under each recipe (``config.resolve``): ``quality`` weight-only, ``speed`` and ``plain``
# per-token fp8 activations; per-channel weight scales; where the product runs dequantized (CPUs, older GPUs)
# activations are still rounded as fp8 x fp8 would: the reported error is the FP8 GPU's.
_PER_TOKEN_FP8 = Defaults(ActivationScheme.DYNAMIC, PER_CHANNEL, round_whenever_quantized=True)
RECIPE_DEFAULTS: dict[str, Defaults] = {
    "quality": Defaults(ActivationScheme.NONE, PER_CHANNEL, round_whenever_quantized=True),
    "speed": _PER_TOKEN_FP8,
    "plain": _PER_TOKEN_FP8,
}
RECIPES = tuple(RECIPE_DEFAULTS)
# The number format of weight-only layers: int8 (the default, see above) or fp8 (for comparisons).
WEIGHT_ONLY_FORMATS = ("int8", "fp8")
ROUNDINGS = ("gptq", "nearest")
DEFAULT_BUDGET = 0.55  # linear weights at most 0.55x their bf16 bytes: ~10% of them may stay in bf16
# Damping of the input Hessian for error-compensating rounding, as a fraction of its mean diagonal. Built-in prompts
# give fewer tokens than a wide layer has inputs, so the statistics are rank-deficient: strong damping keeps the
# rounding from fitting the prompts (measured on a real sentence encoder, see tests/test_text_encoder_real.py).
GPTQ_DAMP = 0.1
# Samples the fitted copy's output error is measured on (for the summary: the fit itself does not use it).
ERROR_SAMPLES = 16


def text_encoder_config(options: UserOptions, recipe: str, weight_only_format: str = "int8") -> Fp8Config | Int8Config:
    """The recipe's scheme with the user's explicit choices on top: ``quality`` weight-only (int8 weights, fp8 for
    block scales), ``speed`` and ``plain`` per-token fp8 activations; per-channel weight scales unless chosen
    otherwise. Weight-only under any recipe is ``weight_only_format`` (int8: the module docstring says why)."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe: {recipe!r} is not allowed; allowed values: {list(RECIPES)}")
    if weight_only_format not in WEIGHT_ONLY_FORMATS:
        raise ValueError(
            f"weight_only_format: {weight_only_format!r} is not allowed; allowed values: {list(WEIGHT_ONLY_FORMATS)}"
        )
    defaults = replace(RECIPE_DEFAULTS[recipe], int8_weight_only=weight_only_format == "int8")
    return resolve(replace(options, quant_format=QuantFormat.FP8.value), None, defaults)  # the recipes' own formats


def quantize_text_encoder(
    model: nn.Module,
    sample_inputs: Sequence[Sample] = (),
    *,
    recipe: str = "quality",
    options: UserOptions | None = None,
    budget: float = DEFAULT_BUDGET,
    rounding: str = "gptq",
    forward: Forward | None = None,
    sensitivity_samples: int = SENSITIVITY_PROMPTS,
    kernel: str | None = None,
    keep_dtype: torch.dtype | None = torch.bfloat16,
    quantize_device: torch.device | str | None = None,
    compute_device: torch.device | str | None = None,
    progress: ProgressCallback | None = None,
    install: ForwardInstaller | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache_context: str = "",
    weight_only_format: str = "int8",
) -> Fp8Report:
    """Quantize ``model``'s linears in place by ``recipe``; returns the report (``report.sensitivity`` holds the
    per-layer table where one was measured).

    ``sample_inputs``: keyword-argument dicts, each run as ``forward(model, **sample)`` (default ``model(**sample)``):
    the calibration data; the first ``sensitivity_samples`` of them also drive the sensitivity pass (one run per
    layer). ``budget``: the linear weights' bytes allowed, as a fraction of their bf16 bytes. ``rounding``: ``gptq``
    (error-compensating, the default) or ``nearest`` (plain rounding; for comparisons). ``keep_dtype``: where
    layers kept in high precision are wider (an fp32 model), they are stored in this dtype. The model is run where
    it is; ``quantize_device`` is where the rounding works (the GPU is much faster). ``cache_dir``: where the
    fitted result is kept and looked up (``fit_cache``), so that the same encoder, samples and settings are fitted
    once; ``None``: not kept. ``cache_context``: what else changes the model's outputs for the same tensors (the
    output layer a caller picked, ...), part of the key. ``weight_only_format``: the format of weight-only layers
    (``int8`` or ``fp8``).
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding: {rounding!r} is not allowed; allowed values: {list(ROUNDINGS)}")
    if not 0.5 < budget <= 2.0:
        raise ValueError(f"budget: {budget!r} must be in (0.5, 2.0], a fraction of the linears' bf16 bytes")
    options = options or UserOptions()
    config = text_encoder_config(options, recipe, weight_only_format)
    if recipe != "plain" and rounding == "gptq" and not gptq.supports(config.weight_group):
        raise ValueError(
            f"weight_granularity: {options.weight_granularity!r} needs recipe 'plain' (the {recipe!r} recipe's "
            "error-compensating rounding takes one scale per channel or per tensor)"
        )
    base = Fp8Recipe.for_model(config, kernel, keep_dtype=keep_dtype)
    candidates = _candidates(model, base)
    if recipe == "plain" or not candidates:
        return prepare_model_for_fp8(
            model,
            base,
            quantize_device=quantize_device,
            compute_device=compute_device,
            progress=progress,
            install=install,
        )
    samples = list(sample_inputs)
    if not samples:
        raise ValueError(f"sample_inputs: the {recipe!r} recipe needs at least one sample input to calibrate on")
    forward = forward or call_model
    cache = FitCache(cache_dir) if cache_dir is not None else None
    settings = {
        "recipe": recipe,
        "config": config,
        "budget": budget,
        "rounding": rounding,
        "sensitivity_samples": sensitivity_samples,
        "damp": GPTQ_DAMP,
        "context": cache_context,
    }
    key = fit_key(model, samples, settings) if cache is not None else ""
    fitted = cache.load(key, candidates) if cache is not None else None
    if fitted is not None:
        logger.info("fp8 text encoder: fitted result read from %s", cache.path(key))
        source = "the stored fit"
    else:
        fitted = _fit(
            model,
            candidates,
            samples,
            forward,
            config,
            budget,
            rounding,
            sensitivity_samples,
            quantize_device,
            progress,
        )
        stored = cache.store(key, fitted) if cache is not None else None
        if stored is not None:
            logger.info("fp8 text encoder: fitted result kept in %s", stored)
        source = "fitted, kept on disk" if stored is not None else "fitted"
    sensitivity = fitted.sensitivity
    overrides = {name: LayerOverride(keep=True, reason="kept in bf16 (sensitive)") for name in sensitivity.kept}
    final = replace(base, overrides=overrides, rounded=fitted.rounded, _methods={})
    report = prepare_model_for_fp8(
        model, final, quantize_device=quantize_device, compute_device=compute_device, install=install
    )
    report.sensitivity = sensitivity
    report.notes.append(
        f"{recipe} recipe ({source}): {len(sensitivity.kept)} sensitive layers kept in bf16, linear weights "
        f"{report.bytes_after / max(1, report.bf16_bytes):.3f}x their bf16 bytes ({mib(report.bytes_after)}); "
        f"output error vs high precision on {fitted.samples} samples {fitted.error:.4f}"
    )
    logger.info("fp8 sensitivity per layer:\n%s", sensitivity.table())
    return report


def _fit(
    model: nn.Module,
    candidates: dict[str, nn.Linear],
    samples: list[Sample],
    forward: Forward,
    config: Fp8Config | Int8Config,
    budget: float,
    rounding: str,
    sensitivity_samples: int,
    quantize_device: torch.device | str | None,
    progress: ProgressCallback | None,
) -> FittedResult:
    """Round every candidate, measure each one's sensitivity, choose the layers kept in high precision, and measure
    the output error of the result; the model is left as it came (its layers are changed only afterwards)."""
    steps = _Steps(progress, 2 * len(candidates) + 1)
    references: list[list[torch.Tensor]] = []
    if rounding == "gptq":
        steps.begin(
            f"reference outputs and error-compensating rounding on {len(samples)} samples",
            len(candidates),
        )
        rounded = _round(model, candidates, samples, forward, config, quantize_device, steps, references)
    else:
        steps.begin(f"reference outputs on {len(samples)} samples", 0)
        references = run_samples(model, samples, forward)
        rounded = {name: _nearest(m.weight.detach(), config) for name, m in candidates.items()}
    reached = {name: module for name, module in candidates.items() if name in rounded}
    probe = samples[: max(1, sensitivity_samples)]
    steps.begin(f"sensitivity of each layer alone in fp8 on {len(probe)} samples", len(reached))
    replay = BlockReplay.record(model, reached, probe, forward)
    if replay is not None:
        logger.info(
            "fp8 text encoder: %.0f%% of the block calls handed back from the reference run", 100 * replay.saved_share()
        )
    sensitivity = SensitivityReport(
        measure_sensitivity(
            model,
            reached,
            rounded,
            probe,
            forward,
            references[: len(probe)],
            config.quantizes_activations,
            steps.layer,
            replay,
        ),
        budget,
    )
    del replay
    choose_kept(sensitivity.layers, budget, *_other_bytes(model, reached, candidates))
    checked = samples[:ERROR_SAMPLES]
    steps.begin(f"output error on {len(checked)} samples", 0)
    error = _output_error_of(
        model,
        reached,
        rounded,
        set(sensitivity.kept),
        checked,
        forward,
        references[: len(checked)],
        config.quantizes_activations,
    )
    steps.done()
    return FittedResult(rounded, sensitivity, error, len(checked))


def _output_error_of(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    rounded: RoundedWeights,
    kept: set[str],
    samples: list[Sample],
    forward: Forward,
    references: list[list[torch.Tensor]],
    quantize_activations: bool,
) -> float:
    """The output error with every layer but the kept ones in fp8, computed with temporary forwards (the layers
    themselves are not changed yet)."""
    with contextlib.ExitStack() as stack:
        for name, module in layers.items():
            if name not in kept:
                stack.enter_context(fake_fp8(module, *rounded[name], quantize_activations))
        return output_error(run_samples(model, samples, forward), references)


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _other_bytes(model: nn.Module, measured: dict, candidates: dict) -> tuple[int, int]:
    """(bytes, bf16 bytes) of the linears the sensitivity pass did not measure but the samples run: fp8 weights a
    model already holds stay fp8, skipped ones stay in 16 bits. Candidates the samples never reach (a vision tower
    beside the text model) go to fp8 and are left out of the budget: the bytes they save must not buy precision
    for layers elsewhere, or a large unused tower would keep a whole text model in bf16."""
    cost = bf16 = 0
    for name, module in _linears(model):
        weight = module.weight
        if name in measured or name in candidates or weight is None:
            continue
        bf16 += 2 * weight.numel()
        cost += weight.numel() + 4 * weight.shape[0] if is_fp8_dtype(weight.dtype) else 2 * weight.numel()
    return cost, bf16


def _candidates(model: nn.Module, recipe: Fp8Recipe) -> dict[str, nn.Linear]:
    """Linears the recipe quantizes on the fly: the ones to fit. fp8 weights a model already holds are used as
    they are (nothing to round); skipped ones stay."""
    linears = _linears(model)
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers to quantize to fp8")
    chosen = {}
    for name, module in linears:
        weight = module.weight
        if weight is None or is_fp8_dtype(weight.dtype) or is_fp8_layer(module):
            continue
        decision = recipe.decide(name, weight)
        if isinstance(decision.method, (Fp8OnlineLinearMethod, Int8OnlineLinearMethod)):
            if not bool(torch.isfinite(weight).all()):
                raise ValueError(f"{name}: weight holds NaN or inf values; refusing to quantize it")
            chosen[name] = module
    return chosen


def _nearest(weight: torch.Tensor, config: Fp8Config | Int8Config) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight rounded to the nearest values of the config's grid (no error compensation)."""
    if isinstance(config, Int8Config):
        return quantize_int8_weight(weight, config.per_channel, None)
    return quantize_weight(weight, config.weight_dtype, config.weight_group)


def _round(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    samples: list[Sample],
    forward: Forward,
    config: Fp8Config | Int8Config,
    quantize_device: torch.device | str | None,
    steps: _Steps,
    references: list[list[torch.Tensor]],
) -> RoundedWeights:
    """Error-compensating rounding of every candidate, on its inputs' statistics from the samples (whose outputs
    are appended to ``references`` on the way). Layers the samples never reach (a vision tower beside the text
    model) are left to plain rounding."""
    rounded: RoundedWeights = {}
    unreached = []
    for name, hessian in input_hessians(model, layers, samples, forward, outputs=references):
        if hessian is None:
            unreached.append(name)
            steps.layer(0, 0, name)
            continue
        weight = layers[name].weight.detach()
        device = torch.device(quantize_device) if quantize_device is not None else weight.device
        fp8_weight, scale = gptq.gptq_quantize(
            weight.to(device), hessian.to(device), config.weight_dtype, config.weight_group, GPTQ_DAMP, name=name
        )
        rounded[name] = (fp8_weight.to(weight.device), scale.to(weight.device))
        steps.layer(len(rounded), len(layers), name)
    if unreached:
        logger.info(
            "fp8: %d linears not reached by the samples get plain rounding (e.g. %s)", len(unreached), unreached[0]
        )
    return rounded


class _Steps:
    """One progress bar over rounding and the sensitivity pass, and the same progress in the log: each phase as it
    starts, then every ``LOG_EVERY`` layers with the time so far and an estimate of the time left (the fitting of
    a full-size encoder takes minutes on a CPU, and a silent log looks like a hang)."""

    LOG_EVERY = 8

    def __init__(self, callback: Callable[[int, int, str], None] | None, total: int) -> None:
        self.callback, self.total, self.count = callback, total, 0
        self.start = time.monotonic()
        self.phase, self.phase_start, self.phase_count, self.phase_layers = "", self.start, 0, 0

    def begin(self, phase: str, layers: int) -> None:
        """A phase of the fitting starts (``layers``: how many layer steps it takes; 0 for one step)."""
        self.phase, self.phase_start, self.phase_count, self.phase_layers = phase, time.monotonic(), 0, layers
        logger.info(
            "fp8 text encoder: %s%s (%.0f s so far)",
            phase,
            f", {layers} layers" if layers else "",
            self.phase_start - self.start,
        )

    def layer(self, _done: int, _of: int, name: str) -> None:
        self.count += 1
        self.phase_count += 1
        if self.callback is not None:
            self.callback(min(self.count, self.total), self.total, name)
        layers = self.phase_layers
        if layers and (self.phase_count % self.LOG_EVERY == 0 or self.phase_count == layers):
            spent = time.monotonic() - self.phase_start
            left = spent / self.phase_count * (layers - self.phase_count)
            logger.info(
                "fp8 text encoder: %s %d/%d layers, %.0f s, about %.0f s left in this phase",
                self.phase,
                self.phase_count,
                layers,
                spent,
                left,
            )

    def done(self) -> None:
        if self.callback is not None:
            self.callback(self.total, self.total, "")
        logger.info("fp8 text encoder: fitted in %.0f s", time.monotonic() - self.start)
