"""The model wrapper that does the host bookkeeping of learnt activation scales for layers that run compiled."""

from __future__ import annotations

from .comfy_ops import LoadPlan

CALIBRATION_WRAPPER_KEY = "fp8_quant.calibration"


def add_calibration_hook(patcher, plan: LoadPlan) -> None:
    """Once per ``apply_model`` call, outside any ``torch.compile`` region (ComfyUI runs model wrappers around the
    compiled module), the learnt activation scales of layers that run compiled get their host bookkeeping
    (``CalibrationTally.after_model_call``). Eager layers do theirs per call and need none of this."""
    tallies = {id(method.calibration): method.calibration for method in plan.recipe.methods()}
    if not tallies or not hasattr(patcher, "add_wrapper_with_key"):
        return
    import comfy.patcher_extension

    def calibration_wrapper(executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        for tally in tallies.values():
            tally.after_model_call()
        return out

    apply_model = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    patcher.add_wrapper_with_key(apply_model, CALIBRATION_WRAPPER_KEY, calibration_wrapper)
