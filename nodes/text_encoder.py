"""Quantize Text Encoder (FP8): a new CLIP whose encoder linears are fp8; the input CLIP is left as it was.

The recipe (quality / speed / plain) is ``fp8_quant.quantize_text_encoder``'s; this node hands it the copied encoder,
the built-in prompts tokenized by the CLIP's own tokenizer as sample inputs, and ComfyUI's way of running them
(``encode_token_weights`` with the CLIP's layer options, on the compute device).
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch
from torch import nn

from fp8_quant import clone_module_tree
from fp8_quant.cuda_graphs import graph_forward
from fp8_quant.prompts import CALIBRATION_PROMPTS, SENSITIVITY_PROMPTS
from fp8_quant.text_encoder import quantize_text_encoder

from .comfy_cast import comfy_weight_caster
from .common import CATEGORY, node_error, unmatched_skips_note
from .fp8_linear import install_comfy_forward
from .patcher import (
    comfy_quantized_layers,
    describe_comfy_quantized,
    forget_patcher_state,
    hand_to_model_management,
    patcher_for,
    restore_backups,
)
from .widgets import forced_kernel, text_encoder_optional_inputs, user_options

logger = logging.getLogger(__name__)
NODE_TITLE = "Quantize Text Encoder (FP8)"
# Where fitted results are kept: a folder, or "off"; default: fp8_quant/text_encoder_fits in ComfyUI's user folder.
FIT_CACHE_VARIABLE = "FP8_QUANT_FIT_CACHE"


def fit_cache_directory() -> Path | None:
    """The folder the quality and speed recipes keep their fitted results in (``None``: not kept)."""
    chosen = os.environ.get(FIT_CACHE_VARIABLE, "").strip()
    if chosen.lower() in ("off", "0", "none", "no"):
        return None
    if chosen:
        return Path(chosen).expanduser()
    import folder_paths

    return Path(folder_paths.get_user_directory()) / "fp8_quant" / "text_encoder_fits"


class QuantizeTextEncoderFP8:
    DESCRIPTION = (
        "Returns a copy of the CLIP whose text-encoder linears are FP8 (T5/UMT5, CLIP, Gemma, Qwen, ...). "
        "The input CLIP is not changed, so other nodes can keep using it."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "quantize"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",)}, "optional": text_encoder_optional_inputs()}

    def quantize(self, clip, kernel: str = "auto", recipe: str = "quality", **options: str):
        """``options``: the other widgets, as for Load FP8 DiT."""
        with node_error(NODE_TITLE):
            choices = user_options(**options)
        kept = comfy_quantized_layers(clip.cond_stage_model)
        if kept and not any(isinstance(m, nn.Linear) for m in clip.cond_stage_model.modules()):
            # A text encoder ComfyUI already loaded quantized (an fp8 "scaled" or .comfy_quant file): nothing to
            # do, and not an error, since the graph still works; the input goes out as it came in.
            return _result(clip, f"{describe_comfy_quantized(kept)}; unchanged")
        model = _private_copy(clip)
        with node_error(NODE_TITLE):
            report = _quantize(clip, model, recipe, choices, forced_kernel(kernel))
        if recipe == "speed" and any(p.device.type == "cuda" for p in model.parameters()):
            report.notes.append(f"CUDA graphs over {_graph_encoders(model)} encoder forward(s), one per prompt length")
        new_clip = _clip_with_model(clip, model)
        # The log has the details once (the core logs the per-layer table); the node a short line.
        kept_names = f"; kept: {report.kept_names()}" if report.skipped else ""
        logger.info("text encoder %s: %s%s", type(model).__name__, report.summary(), kept_names)
        summary = report.short_summary()
        summary += f"; {describe_comfy_quantized(kept)}" if kept else ""
        summary += unmatched_skips_note(NODE_TITLE, choices.skip_layers, report)
        if report.sensitivity is not None:
            summary += "; " + report.sensitivity.compact()
        return _result(new_clip, summary, log=False)


def _private_copy(clip) -> nn.Module:
    """The input's encoder as new modules over the same tensors, unpatched, with none of its patcher's state."""
    model = clone_module_tree(clip.cond_stage_model)
    restore_backups(model, clip.patcher)
    forget_patcher_state(model)
    return model


def _quantize(clip, model: nn.Module, recipe: str, choices, kernel: str | None):
    """The core's recipe on the copy, run where ComfyUI runs the encoder: a copy of an encoder still on the offload
    device moves to the GPU first (its own parameters: the input stays where it is), since fitting runs it many
    times."""
    import comfy.model_management
    import comfy.utils

    device = comfy.model_management.get_torch_device()
    elsewhere = _bytes_off(model, device)
    if device.type == "cuda" and elsewhere:
        comfy.model_management.free_memory(elsewhere, device)
        model.to(device)
    caster = comfy_weight_caster()
    progress = comfy.utils.ProgressBar(1)
    _set_clip_options(clip, model, device)
    try:
        samples, probe = [], SENSITIVITY_PROMPTS  # the plain recipe fits nothing
        if recipe != "plain":
            tokens = [clip.tokenize(prompt) for prompt in CALIBRATION_PROMPTS]
            samples, probe = batched_samples(model, tokens, SENSITIVITY_PROMPTS)
        return quantize_text_encoder(
            model,
            samples,
            recipe=recipe,
            sensitivity_samples=probe,
            options=choices,
            forward=_encode,
            kernel=kernel,
            keep_dtype=None,  # layers kept in high precision stay as ComfyUI holds them
            quantize_device=device if device.type == "cuda" else None,
            compute_device=device,
            progress=lambda done, total, name: progress.update_absolute(done, total),
            install=lambda module: install_comfy_forward(module, caster),
            cache_dir=fit_cache_directory() if recipe != "plain" else None,
            cache_context=f"clip layer {clip.layer_idx}",
        )
    finally:
        model.reset_clip_options()


def batched_samples(model: nn.Module, prompts: list, probe_prompts: int) -> tuple[list[dict], int]:
    """The prompts' tokens as sample inputs, prompts of the same token lengths encoded together, and how many of
    the samples hold the first ``probe_prompts`` prompts (the sensitivity pass runs those once per layer).

    ComfyUI encodes a prompt's sections as one batch and joins their outputs along the tokens, so prompts whose
    sections have the same lengths (every CLIP prompt: 77 tokens) give the same activations when they are sent as
    the sections of one sample, in a fraction of the calls. Whether this encoder does join them so is measured
    once on two prompts (a wrapper that reads only the first section, or pads a batch, would not): where it does
    not, each prompt stays a sample of its own."""
    singles = [{"tokens": tokens} for tokens in prompts]
    signatures = [_signature(tokens) for tokens in prompts]
    pair = [i for i, signature in enumerate(signatures) if signature is not None and signature == signatures[0]][:2]
    if len(pair) < 2 or not _joins_sections(model, [prompts[i] for i in pair]):
        return singles, probe_prompts
    probe = _groups(prompts[:probe_prompts], signatures[:probe_prompts])
    rest = _groups(prompts[probe_prompts:], signatures[probe_prompts:])
    logger.info(
        "fp8 text encoder: %d prompts encoded as %d batches of equal token lengths", len(prompts), len(probe + rest)
    )
    return probe + rest, len(probe)


MAX_BATCH = 16  # prompts encoded together (bounds the activations held for each call)


def _signature(tokens) -> tuple | None:
    """Each tokenizer's section lengths, where every weight is 1 (a weighted prompt adds an empty pass)."""
    if not isinstance(tokens, dict):
        return None
    signature = []
    for key, sections in sorted(tokens.items()):
        if not isinstance(sections, list) or len(sections) != 1 or not isinstance(sections[0], list):
            return None
        if not all(isinstance(t, tuple) and len(t) >= 2 and t[1] == 1.0 for t in sections[0]):
            return None
        signature.append((key, len(sections[0])))
    return tuple(signature)


def _merged(prompts: list) -> dict:
    return {"tokens": {key: [section for tokens in prompts for section in tokens[key]] for key in prompts[0]}}


def _groups(prompts: list, signatures: list) -> list[dict]:
    by_signature: dict = {}
    for tokens, signature in zip(prompts, signatures):
        by_signature.setdefault(signature, []).append(tokens)
    groups = []
    for signature, members in by_signature.items():
        if signature is None:
            groups.extend({"tokens": tokens} for tokens in members)
            continue
        groups.extend(_merged(members[i : i + MAX_BATCH]) for i in range(0, len(members), MAX_BATCH))
    return groups


def _joins_sections(model: nn.Module, pair: list) -> bool:
    """Whether two prompts sent as the sections of one sample give the two prompts' outputs joined along the
    tokens (the first output tensor; the pooled vector is the first section's)."""
    from fp8_quant.calibration import output_tensors

    try:
        with torch.no_grad():
            alone = [output_tensors(_encode(model, tokens))[0] for tokens in pair]
            together = output_tensors(_encode(model, **_merged(pair)))[0]
    except Exception as error:  # any failure means: do not batch
        logger.info("fp8 text encoder: prompts encoded one by one (%s)", error)
        return False
    joined = torch.cat(alone, dim=-2)
    if together.shape != joined.shape:
        return False
    error = (together.float() - joined.float()).norm() / joined.float().norm().clamp_min(1e-30)
    return bool(error < 1e-3)


def _graph_encoders(model: nn.Module) -> int:
    """The speed recipe's launch saving: each transformer of ComfyUI's text-encoder wrappers (``SDClipModel``
    and kin: a ``transformer`` under a module that encodes tokens) replays as CUDA graphs, one per prompt length.
    Where the model is not on a CUDA GPU the wrapper runs it eagerly."""
    count = 0
    for module in model.modules():
        transformer = getattr(module, "transformer", None)
        if isinstance(transformer, nn.Module) and hasattr(module, "encode_token_weights"):
            graph_forward(transformer, ignored=_ignored_arguments(transformer))
            count += 1
    return count


def _ignored_arguments(transformer: nn.Module) -> tuple[str, ...]:
    """ComfyUI's T5 and Llama-family transformers take ``num_tokens`` (the real tokens of each prompt) and do not
    read it; left out of the graph's signature, every prompt of one padded length shares a graph. CLIP reads it (the
    pooled token), so it stays there."""
    import comfy.text_encoders.llama
    import comfy.text_encoders.t5

    known = (comfy.text_encoders.t5.T5, getattr(comfy.text_encoders.llama, "BaseLlama", ()))
    return ("num_tokens",) if isinstance(transformer, known) else ()


def _encode(model: nn.Module, tokens):
    """One prompt through the encoder, as ``CLIP.encode_from_tokens`` runs it: (cond, pooled[, extra])."""
    return model.encode_token_weights(tokens)


def _set_clip_options(clip, model: nn.Module, device: torch.device) -> None:
    """The options ``CLIP.encode_from_tokens`` sets before it encodes (the CLIP's layer, the execution device)."""
    model.reset_clip_options()
    if clip.layer_idx is not None:
        model.set_clip_options({"layer": clip.layer_idx})
    model.set_clip_options({"execution_device": device})


def _bytes_off(model: nn.Module, device: torch.device) -> int:
    """Bytes of the copy not yet on ``device`` (tensors the input already holds there are shared, not copied)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type != device.type)


def _clip_with_model(clip, model: nn.Module):
    """The CLIP's settings (tokenizer, layer, options) with a model and patcher of its own. Not ``clip.clone()``:
    that makes a patcher over the input's model, and a dynamic one detaches from that model when dropped."""
    new_clip = copy.copy(clip)
    if isinstance(getattr(clip, "tokenizer_options", None), dict):
        new_clip.tokenizer_options = dict(clip.tokenizer_options)
    new_clip.cond_stage_model = model
    new_clip.patcher = patcher_for(clip.patcher, model)
    hand_to_model_management(new_clip.patcher)
    return new_clip


def _result(clip, summary: str, log: bool = True) -> dict:
    summary = f"text encoder {type(clip.cond_stage_model).__name__}: {summary}"
    if log:
        logger.info(summary)
    return {"ui": {"text": [summary]}, "result": (clip,)}
