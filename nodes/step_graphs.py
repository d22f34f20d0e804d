"""ComfyUI glue for step graphs (``fp8_quant.step_graphs``): two model wrappers on the patcher Load FP8 DiT returns.

- ``DIFFUSION_MODEL``: around the diffusion model's forward, inside ``apply_model``; it hands the step to the core's
  ``StepGraphs`` with what ComfyUI runs inside the model that a replay would skip (other nodes' diffusion-model
  wrappers, model patches and block replacements, an attention function not the pack's or one that decides per
  step, dynamic VRAM paging the weights), so that such steps run eagerly with the reason.
- ``OUTER_SAMPLE``: around a whole sampling run; at its end (also after an interrupt or an error) the graphs are
  dropped, their memory freed before the decoder runs, and one line in the log says how the run went.
Wrappers are copied with the patcher, so a clone (a LoRA on top) has them too; the graphs follow the weights'
memory, so a patched clone gets graphs of its own. No ComfyUI import at module level.
"""

from __future__ import annotations

import logging

import torch

from fp8_quant.choices import CudaGraphs
from fp8_quant.step_graphs import StepGraphs

from .attention import OVERRIDE_KEY

logger = logging.getLogger(__name__)

STEP_GRAPHS_KEY = "fp8_quant.step_graphs"


def add_step_graphs(patcher, choice: CudaGraphs, device=None) -> str:
    """Set up step graphs on ``patcher`` (a model no other node holds yet); the summary's phrase for it, empty on a
    device without CUDA (``device``: the compute device, for that phrase; the wrappers check each call's own)."""
    if choice is CudaGraphs.OFF:
        return "CUDA graphs off"
    if not hasattr(patcher, "add_wrapper_with_key"):
        return "CUDA graphs off (this ComfyUI has no model wrappers)"
    import comfy.patcher_extension

    wrappers = comfy.patcher_extension.WrappersMP
    graphs = StepGraphs(patcher.model.diffusion_model)

    def diffusion_model_wrapper(executor, *args, **kwargs):
        if torch.compiler.is_compiling():  # traced by torch.compile (ComfyUI's compile node): nothing to add
            return executor(*args, **kwargs)
        options = transformer_options_of(args, kwargs)
        refused = foreign_work(options, diffusion_model_wrapper, wrappers.DIFFUSION_MODEL)
        return graphs.run(executor, args, kwargs, refused)

    def outer_sample_wrapper(executor, *args, **kwargs):
        try:
            return executor(*args, **kwargs)
        finally:
            if graphs.calls:
                logger.info("Load FP8 DiT: %s", graphs.finish())

    diffusion_model_wrapper.step_graphs = graphs  # for the summary's readers (tests, other glue)
    patcher.add_wrapper_with_key(wrappers.DIFFUSION_MODEL, STEP_GRAPHS_KEY, diffusion_model_wrapper)
    patcher.add_wrapper_with_key(wrappers.OUTER_SAMPLE, STEP_GRAPHS_KEY, outer_sample_wrapper)
    if device is not None and getattr(device, "type", None) != "cuda":
        return ""  # nothing to say on the node: no CUDA here (the wrappers stay, for a model moved later)
    return "CUDA graphs auto"  # each run's count and reasons go to the log (the node's box has room for little)


def step_graphs_of(patcher) -> StepGraphs | None:
    """The step graphs ``add_step_graphs`` set up on ``patcher`` (or on the model it was cloned from)."""
    for wrapper in (getattr(patcher, "wrappers", None) or {}).get("diffusion_model", {}).get(STEP_GRAPHS_KEY, []):
        graphs = getattr(wrapper, "step_graphs", None)
        if graphs is not None:
            return graphs
    return None


def transformer_options_of(args: tuple, kwargs: dict) -> dict:
    """The diffusion model's ``transformer_options``: a keyword, or its last positional dict (Wan and Flux pass it
    positionally to their wrappers)."""
    options = kwargs.get("transformer_options")
    if isinstance(options, dict):
        return options
    return next((arg for arg in reversed(args) if isinstance(arg, dict)), {})


def foreign_work(options: dict, ours, wrapper_kind: str) -> str | None:
    """What runs Python inside the diffusion model per call that a replay would skip, as the reason to stay eager;
    ``None`` where there is nothing but the pack's own (``ours``: this wrapper, among the ``wrapper_kind``
    wrappers: ComfyUI's ``WrappersMP.DIFFUSION_MODEL``)."""
    if options.get("prefetch_dynamic_vbars"):
        return "ComfyUI's dynamic VRAM pages the weights in and out"
    wrapped = (options.get("wrappers") or {}).get(wrapper_kind) or {}
    others = sorted(key for key, functions in wrapped.items() if any(function is not ours for function in functions))
    if others:
        return f"another node's model wrapper ({', '.join(others)}) runs inside the model"
    for kind in ("patches", "patches_replace"):
        named = sorted(name for name, entries in (options.get(kind) or {}).items() if entries)
        if named:
            return f"model {kind.replace('_', ' ')} ({', '.join(named)}) run inside the model"
    attention = options.get(OVERRIDE_KEY)
    if attention is not None:
        if not getattr(attention, "fp8_quant_attention", False):
            return "another node's attention function runs inside the model"
        if getattr(attention, "decides_per_step", False):
            return "8-bit attention switches to 16-bit in the first and last steps"
    return None
