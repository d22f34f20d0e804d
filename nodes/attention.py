"""ComfyUI glue for the pack's attention: the override ComfyUI's attention functions call, set on a model clone,
and the Patch Attention node.

ComfyUI (0.16 and newer) lets a model carry its own attention in ``transformer_options
["optimized_attention_override"]``: every attention function of ``comfy.ldm.modules.attention`` hands the call
to it with its own function as the first argument. The override turns ComfyUI's call shape (``[B, N, H*D]`` and
``heads``, or ``[B, H, N, D]`` with ``skip_reshape``) into the core's and falls back to ComfyUI's function for
anything the core does not take. Nothing of ComfyUI's is replaced globally, and the input model is left as it was.
"""

from __future__ import annotations

import logging

from fp8_quant.attention import ATTENTION_CHOICES, AttentionChoice, AttentionDispatcher, in_guarded_step

from .common import CATEGORY, node_error

logger = logging.getLogger(__name__)

OVERRIDE_KEY = "optimized_attention_override"
NODE_TITLE = "Patch Attention (8-bit pack)"
ATTENTION_TOOLTIP = (
    "auto: the fastest 16-bit attention torch has on this GPU, measured once per shape (cuDNN on an H100/H200, "
    "where ComfyUI picks FlashAttention-2), at 16-bit precision. 8bit (experimental): the pack's 8-bit kernel "
    "(int8 QK, fp8 PV; faster than cuDNN only on long videos, with 10-100x the error of 16-bit attention), "
    "except in the first and last steps. comfy: ComfyUI's own attention, untouched. Masks and the CPU always use "
    "ComfyUI's."
)
GUARDED_STEPS = 1  # first and last sampling steps kept in 16-bit attention when 8bit is chosen


def supports_attention_override() -> bool:
    """Whether this ComfyUI's attention functions read ``optimized_attention_override``: its ``wrap_attn``
    decorator hands each call to the override (0.16 and newer)."""
    try:
        import comfy.ldm.modules.attention as attention
    except ImportError:
        return False
    return hasattr(attention, "wrap_attn")


def make_override(dispatcher: AttentionDispatcher):
    """The function ComfyUI's attention calls as ``override(func, q, k, v, heads, mask=None, ...)``."""
    guard: dict = {}

    def attention_override(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                           skip_output_reshape=False, **kwargs):  # fmt: skip
        def comfy():
            return func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                        skip_output_reshape=skip_output_reshape, **kwargs)  # fmt: skip

        if skip_reshape:
            b, _, n_q, dim_head = q.shape
            q4, k4, v4 = q, k, v
        else:
            b, n_q, inner = q.shape
            if inner % heads or k.shape[-1] != inner or v.shape[-1] != inner:
                return comfy()
            dim_head = inner // heads
            q4, k4, v4 = (t.reshape(t.shape[0], t.shape[1], heads, dim_head).transpose(1, 2) for t in (q, k, v))
        low_precision = kwargs.get("low_precision_attention", True) is not False
        if low_precision and dispatcher.choice is AttentionChoice.LOWBIT:
            low_precision = not _guarded(guard, kwargs.get("transformer_options") or {})
        extra = {key: kwargs[key] for key in ("scale", "enable_gqa") if key in kwargs}
        out = dispatcher.attend(q4, k4, v4, mask, low_precision=low_precision, **extra)
        if out is None:
            return comfy()
        if skip_output_reshape:
            return out
        return out.transpose(1, 2).reshape(b, n_q, heads * dim_head)

    # What step graphs (``step_graphs``) ask of an attention function: is it the pack's, and does its Python decide
    # per step (the 8-bit kernel's guarded first and last steps read the sigmas), which a replay would not run.
    attention_override.fp8_quant_attention = True
    attention_override.decides_per_step = dispatcher.choice is AttentionChoice.LOWBIT
    return attention_override


def _guarded(cache: dict, options: dict) -> bool:
    """Whether this step is one of the first or last by sigma (computed once per step: it reads the sigmas)."""
    import torch

    sigma = options.get("sigmas")
    if sigma is None or torch.compiler.is_compiling():
        return False
    if cache.get("sigma") is not sigma:
        cache["sigma"] = sigma
        cache["guarded"] = in_guarded_step(sigma, options.get("sample_sigmas"), GUARDED_STEPS)
    return cache["guarded"]


def patch_attention(model, choice: AttentionChoice | str, in_place: bool = False):
    """A clone of ``model`` (ComfyUI's ``ModelPatcher``) whose attention runs as ``choice`` says, and a line
    saying so; ``model`` itself is not changed (``in_place``: a model no other node holds yet, set directly)."""
    dispatcher = AttentionDispatcher(choice)
    if dispatcher.choice is AttentionChoice.COMFY and dispatcher.forced is None:
        return model, "attention: ComfyUI's own"
    if not supports_attention_override():
        return model, "attention: ComfyUI's own (this ComfyUI has no attention override hook)"
    patched = model if in_place else model.clone()
    patched.model_options.setdefault("transformer_options", {})[OVERRIDE_KEY] = make_override(dispatcher)
    return patched, f"attention {dispatcher.choice.value}, chosen per shape at the first step (in the log)"


class PatchAttentionFP8:
    DESCRIPTION = (
        "Runs a model's attention with the fastest 16-bit attention torch has on this GPU (measured), or the "
        "pack's 8-bit kernel; works on any MODEL (stock, GGUF, Load FP8 DiT). The input MODEL is not changed."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "attention": (list(ATTENTION_CHOICES), {"default": AttentionChoice.AUTO.value,
                                                          "tooltip": ATTENTION_TOOLTIP}),
            }
        }  # fmt: skip

    def patch(self, model, attention: str = AttentionChoice.AUTO.value):
        with node_error(NODE_TITLE):
            patched, summary = patch_attention(model, attention)
        logger.info("%s: %s", NODE_TITLE, summary)
        return {"ui": {"text": [summary]}, "result": (patched,)}
