"""The ComfyUI-protocol fp8 Linear, against stand-ins with the attributes ComfyUI's classes have.

ComfyUI itself is not importable in CI; these tests pin the protocol logic (state-dict loading, LoRA
convert/set, lowvram weight functions, class swapping) and the integration tests run it in a real ComfyUI.
"""

import copy
import re
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from checkpoints import source_weights, write_dialect
from helpers import outlier_input, rel_err
from safetensors.torch import save_file
from torch import nn

from fp8_quant import Fp8Config, Fp8Recipe, UserOptions, clone_module_tree, prepare_model_for_fp8
from fp8_quant.config import online_config, stored_config
from fp8_quant.formats import convert_checkpoint, load_checkpoint
from fp8_quant.scheme import MX_BLOCK, PER_CHANNEL, PER_TENSOR
from nodes.comfy_ops import LoadPlan, make_fp8_operations
from nodes.fp8_linear import Fp8ComfyLinearMixin, WeightCaster, install_comfy_forward


class StandInManualCast:
    """Like comfy.ops.manual_cast: weights are cast to the input's dtype and device per call."""

    class Linear(nn.Linear):
        comfy_cast_weights = True
        weight_function: ClassVar[list] = []  # as in comfy.ops.CastWeightBiasOp
        bias_function: ClassVar[list] = []

        def reset_parameters(self):
            return None

        def forward(self, x):
            weight = self.weight.to(x.device, x.dtype)
            for function in self.weight_function:
                weight = function(weight)
            bias = self.bias.to(x.device, x.dtype) if self.bias is not None else None
            return F.linear(x, weight, bias)


class StandInPlainOps:
    """Like comfy.ops.disable_weight_init: torch's own forward, no cast (ComfyUI's patcher turns casting on for the
    modules it offloads)."""

    class Linear(nn.Linear):
        comfy_cast_weights = False
        weight_function: ClassVar[list] = []
        bias_function: ClassVar[list] = []

        def reset_parameters(self):
            return None


class TinyDiT(nn.Module):
    """Layer names as in checkpoints.LAYERS, plus a norm and a head that stay high precision; ``dtype`` as ComfyUI
    passes its compute dtype to the operations it builds a model with."""

    def __init__(self, operations, dtype=None):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Module()])
        block = self.blocks[0]
        block.norm = nn.LayerNorm(32, dtype=dtype)
        block.attn = nn.Module()
        block.attn.q = operations.Linear(32, 64, dtype=dtype)
        block.attn.k = operations.Linear(32, 64, dtype=dtype)
        block.ffn = nn.ModuleList([operations.Linear(64, 128, dtype=dtype)])
        self.head = operations.Linear(64, 16, dtype=dtype)

    def forward(self, x):
        block = self.blocks[0]
        h = block.norm(x)
        h = block.attn.q(h) * torch.sigmoid(block.attn.k(h))
        return block.ffn[0](h).sum(-1, keepdim=True) + self.head(h)


def reference_model(source):
    model = TinyDiT(StandInManualCast)
    model.load_state_dict({k: v for k, v in source.items()}, strict=False)
    return model


def weights_for_model(source):
    out = dict(source)
    out.pop("blocks.0.attn.q.bias", None)
    return out


@pytest.fixture
def source():
    tensors = source_weights()
    tensors["blocks.0.norm.bias"] = torch.zeros(32)
    tensors["head.bias"] = torch.zeros(16)
    return {k: v / 4 for k, v in tensors.items()}


def fp8_model(tmp_path, source, output_format="comfy-scaled", per_channel=False, block=None):
    """``per_channel``: the weight-scale format's per-channel scales, else one scale per tensor; ``block``: a
    weight-scale file with that block granularity instead."""
    src = tmp_path / "bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in source.items()}, str(src))
    dst = tmp_path / "fp8.safetensors"
    if block is not None:
        write_dialect(dst, "weight-scale", {k: v.to(torch.bfloat16).float() for k, v in source.items()}, group=block)
    else:
        convert_checkpoint(src, dst, output_format, weight_group=PER_CHANNEL if per_channel else PER_TENSOR)
    checkpoint = load_checkpoint(dst)
    plan = LoadPlan(Fp8Recipe.for_checkpoint(checkpoint.config, UserOptions()))
    model = TinyDiT(make_fp8_operations(StandInManualCast, plan))
    model.load_state_dict(checkpoint.state_dict, strict=False)
    return model, plan


# One scale per tensor (ComfyUI's format) loses the quiet channels of these weights (a 1000x channel spread);
# per-channel scales keep them.
@pytest.mark.parametrize(
    "output_format, per_channel, bound", [("comfy-scaled", False, 0.12), ("weight-scale", True, 0.06)]
)
def test_fp8_file_loads_through_operations(tmp_path, source, output_format, per_channel, bound):
    model, plan = fp8_model(tmp_path, source, output_format, per_channel)
    assert model.blocks[0].attn.q.weight.dtype == torch.float8_e4m3fn
    assert model.head.weight.dtype == torch.bfloat16  # skipped by the writer, kept by the loader
    assert isinstance(model.blocks[0].attn.q, StandInManualCast.Linear)
    assert len(plan.report.quantized) == 3 and len(plan.report.skipped) == 1
    x = outlier_input(2, 5, 32, seed=51)
    assert rel_err(model(x), reference_model(source)(x)) < bound


def test_bf16_file_is_quantized_on_the_fly_layer_by_layer(source):
    plan = LoadPlan(Fp8Recipe.for_checkpoint(None, UserOptions()))
    model = TinyDiT(make_fp8_operations(StandInManualCast, plan))
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in source.items()}, strict=False)
    assert model.blocks[0].ffn[0].weight.dtype == torch.float8_e4m3fn
    assert model.blocks[0].ffn[0].weight_scale.shape == (128,)
    assert model.head.weight.dtype == torch.bfloat16
    assert {layer.name for layer in plan.report.skipped} == {"head"}
    x = outlier_input(2, 5, 32, seed=52)
    assert rel_err(model(x.float()).float(), reference_model(source)(x)) < 0.06


def test_plain_operations_run_a_bf16_file_in_the_model_dtype(source):
    """Around its fp8 linears the loader builds ComfyUI's plain operations (no cast per call): a layer kept in high
    precision must then hold its weight in the dtype the model computes in (fp16 for Wan), not the file's bf16."""
    plan = LoadPlan(Fp8Recipe.for_checkpoint(None, UserOptions()))
    model = TinyDiT(make_fp8_operations(StandInPlainOps, plan), dtype=torch.float16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in source.items()}, strict=False)
    assert model.blocks[0].ffn[0].weight.dtype == torch.float8_e4m3fn
    assert model.head.weight.dtype == torch.float16 and model.head.bias.dtype == torch.float16
    assert {layer.name for layer in plan.report.skipped} == {"head"}
    x = outlier_input(2, 5, 32, seed=52)
    out = model(x.half())
    assert out.dtype == torch.float16
    assert rel_err(out.float(), reference_model(source)(x)) < 0.06


def test_weights_left_in_the_file_dtype_go_to_the_dtype_comfyui_built_them_for():
    """ComfyUI's dynamic VRAM loads some modules' tensors as the file has them and records the dtype it built the
    module for; the classic patcher this pack uses does not cast them, so the loader does, once. Fp8 layers and
    modules without a recorded dtype stay as they are."""
    from nodes.dtype_policy import store_in_built_dtypes

    model = nn.Module()
    model.embed = nn.Embedding(8, 4).to(torch.bfloat16)
    model.embed.weight_comfy_model_dtype = torch.float16
    model.norm = nn.LayerNorm(4, dtype=torch.bfloat16)  # nothing recorded: as the file has it
    model.fp8 = nn.Linear(4, 4, bias=False)
    model.fp8.weight = nn.Parameter(torch.ones(4, 4).to(torch.float8_e4m3fn), requires_grad=False)
    model.fp8.weight_comfy_model_dtype = torch.float16
    model.fp8.fp8 = object()  # what fp8_quant.layer_state.is_fp8_layer looks for
    embed_values = model.embed.weight.detach().clone()
    store_in_built_dtypes(model)
    assert model.embed.weight.dtype == torch.float16
    torch.testing.assert_close(model.embed.weight.float(), embed_values.float(), rtol=1e-3, atol=1e-3)
    assert model.norm.weight.dtype == torch.bfloat16
    assert model.fp8.weight.dtype == torch.float8_e4m3fn


def test_shape_mismatch_names_the_layer(source):
    plan = LoadPlan(Fp8Recipe.for_checkpoint(None, UserOptions()))
    model = TinyDiT(make_fp8_operations(StandInManualCast, plan))
    bad = dict(source)
    bad["blocks.0.attn.k.weight"] = torch.randn(64, 40)
    with pytest.raises(RuntimeError, match=r"blocks\.0\.attn\.k: weight has shape \[64, 40\]"):
        model.load_state_dict(bad, strict=False)


def test_bad_scale_in_state_dict_names_the_layer(tmp_path, source):
    src = tmp_path / "bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in source.items()}, str(src))
    convert_checkpoint(src, tmp_path / "fp8.safetensors")
    checkpoint = load_checkpoint(tmp_path / "fp8.safetensors")
    checkpoint.state_dict["blocks.0.ffn.0.weight_scale"] = torch.tensor(0.0)
    plan = LoadPlan(Fp8Recipe.for_checkpoint(checkpoint.config, UserOptions()))
    model = TinyDiT(make_fp8_operations(StandInManualCast, plan))
    with pytest.raises(ValueError, match=r"blocks\.0\.ffn\.0\.weight_scale"):
        model.load_state_dict(checkpoint.state_dict, strict=False)


def lora_delta(layer, seed):
    generator = torch.Generator().manual_seed(seed)
    down = torch.randn(4, layer.in_features, generator=generator)
    return 0.2 * torch.randn(layer.out_features, 4, generator=generator) @ down


# Per channel, and groups of 32 inputs per channel (the ffn's 64 inputs are two groups): convert_weight and
# set_weight must apply the block scales where they belong.
GRANULARITIES = pytest.mark.parametrize("block", [None, MX_BLOCK], ids=["channel", "groups"])


@GRANULARITIES
def test_lora_patch_and_unpatch_follow_modelpatcher(tmp_path, source, block):
    """patch_weight_to_device: fp32 copy -> convert_weight -> + delta -> set_weight; unpatch restores the backup."""
    model, _ = fp8_model(tmp_path, source, "weight-scale", per_channel=True, block=block)
    if block is not None:
        assert model.blocks[0].ffn[0].weight_scale.shape == (128, 2)
    reference = reference_model(source)
    x = outlier_input(3, 7, 32, seed=53)
    before = model(x)
    reference_before = reference(x)
    backups = {}
    for name in ("blocks.0.attn.q", "blocks.0.ffn.0", "head"):
        layer = model.get_submodule(name)
        ref_layer = reference.get_submodule(name)
        delta = lora_delta(layer, seed=len(backups))
        backups[name] = layer.weight
        temp = layer.weight.to(torch.float32, copy=True)
        temp = layer.convert_weight(temp, inplace=True)
        layer.set_weight(temp + delta, seed=0)
        with torch.no_grad():
            ref_layer.weight += delta
    patched = model(x)
    expected = reference(x)
    assert rel_err(patched, before) > 0.2  # the LoRA really changed the output
    assert rel_err(patched, expected) < 0.08
    assert rel_err(patched - before, expected - reference_before) < 0.15  # and changed it as it changes fp32
    for name, weight in backups.items():
        model.get_submodule(name).weight = weight  # ModelPatcher.unpatch_model: set_attr_param(backup)
    assert torch.equal(model(x), before)


class NewLowVramPatch:
    """ComfyUI's LowVramPatch since it stopped converting: real values in (compute dtype), real values out."""

    is_lowvram_patch = True

    def __init__(self, delta, convert_func=None, set_func=None):
        self.delta, self.convert_func, self.set_func = delta, convert_func, set_func

    def __call__(self, weight):
        return (weight.float() + self.delta).to(weight.dtype)


class OldLowVramPatch(NewLowVramPatch):
    """Older ComfyUI's LowVramPatch: converts through the layer's convert_weight / set_weight when it has them."""

    def __call__(self, weight):
        if self.convert_func is not None:
            weight = self.convert_func(weight.to(torch.float32, copy=True), inplace=True)
        patched = weight.float() + self.delta
        if self.set_func is None:
            return patched.to(weight.dtype)
        return self.set_func(patched, return_weight=True)


@GRANULARITIES
@pytest.mark.parametrize("patch_class", [NewLowVramPatch, OldLowVramPatch])
def test_lowvram_weight_function_matches_in_place_patch(tmp_path, source, patch_class, block):
    """A lowvram patch runs per forward on the real weight; the same patch loaded in place gives the same output."""
    model, _ = fp8_model(tmp_path, source, "weight-scale", per_channel=True, block=block)
    layer = model.blocks[0].ffn[0]
    delta = lora_delta(layer, seed=9)
    x = outlier_input(2, 6, 32, seed=54)
    layer.weight_function = [patch_class(delta, layer.convert_weight, layer.set_weight)]
    lowvram = model(x)
    layer.weight_function = []
    assert layer.weight.dtype == torch.float8_e4m3fn  # nothing stored was changed
    temp = layer.convert_weight(layer.weight.to(torch.float32), inplace=False)
    layer.set_weight(temp + delta)
    # lowvram multiplies the patched weight in high precision, a full load re-quantizes it: the same up to fp8
    # (0.04 here: the model sums this layer's 128 outputs; a misplaced block scale gives order 1).
    assert rel_err(model(x), lowvram) < 0.06


def test_text_encoder_style_class_swap_keeps_original(source):
    original = reference_model(source)
    before = {k: v.clone() for k, v in original.state_dict().items()}
    x = outlier_input(2, 4, 32, seed=55)
    expected = original(x)
    clone = clone_module_tree(original)
    report = prepare_model_for_fp8(clone, online_config(UserOptions()), install=install_comfy_forward)
    q = clone.blocks[0].attn.q
    assert isinstance(q, Fp8ComfyLinearMixin) and isinstance(q, StandInManualCast.Linear)
    assert type(original.blocks[0].attn.q) is StandInManualCast.Linear
    assert {layer.name for layer in report.skipped} == {"head"}
    assert rel_err(clone(x), expected) < 0.06
    for key, value in original.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(original(x), expected)
    # The protocol works on swapped layers too.
    delta = lora_delta(q, seed=3)
    q.set_weight(q.convert_weight(q.weight.float()) + delta)
    assert q.weight.dtype == torch.float8_e4m3fn


def test_option_mapping():
    online = online_config(UserOptions())
    assert (online.to_dict()["activation_scheme"], online.to_dict()["weight_granularity"]) == ("calibrated", "auto")
    assert not online.round_activations_on_dequant
    assert online_config(UserOptions(activation_scheme="none")).quantizes_activations is False
    explicit = online_config(UserOptions(activation_scheme="static"))
    assert explicit.to_dict()["activation_granularity"] == "tensor" and explicit.round_activations_on_dequant
    inferred = Fp8Config(weight_granularity="tensor", activation_scheme="static", activation_granularity="tensor")
    assert stored_config(inferred, UserOptions()).activation_scheme == "static"
    dynamic = stored_config(inferred, UserOptions(activation_scheme="dynamic"))
    assert dynamic.to_dict()["activation_granularity"] == "token"
    assert stored_config(Fp8Config(), UserOptions()).activation_scheme == "calibrated"
    assert stored_config(Fp8Config(), UserOptions(activation_scheme="static")).learns_activation_scales


@pytest.mark.parametrize(
    "options, option",
    [
        ({"skip_layers": "re:(["}, "skip_layers"),
        ({"activation_scheme": "smooth"}, "activation_scheme"),
        ({"activation_granularity": "row"}, "activation_granularity"),
        ({"weight_granularity": "row"}, "weight_granularity"),
    ],
)
def test_bad_user_option_names_the_option_and_value(options, option):
    with pytest.raises(ValueError, match=f"^{option}: .*{re.escape(next(iter(options.values())))}"):
        UserOptions(**options)


def test_unknown_kernel_names_the_option():
    with pytest.raises(ValueError, match="^kernel: unknown fp8 kernel 'fastest'"):
        Fp8Recipe.for_checkpoint(None, UserOptions(), kernel="fastest")


def test_static_recipe_without_input_scale_learns_it():
    inferred = Fp8Config(weight_granularity="tensor", activation_scheme="static", activation_granularity="tensor")
    recipe = Fp8Recipe.for_checkpoint(inferred, UserOptions())
    weight = torch.zeros(16, 16, dtype=torch.float8_e4m3fn)
    with_scale = recipe.decide("a", weight, has_input_scale=True)
    without = recipe.decide("b", weight, has_input_scale=False)
    assert with_scale.method is without.method and with_scale.method.config.activation_scheme == "static"
    assert with_scale.reason == "fp8 in file" and "learnt at run time" in without.reason


def test_user_skipped_fp8_layer_is_dequantized(tmp_path, source):
    """skip_layers on an fp8 file keeps that layer in high precision: its real values, not the raw fp8 numbers."""
    src = tmp_path / "bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in source.items()}, str(src))
    convert_checkpoint(src, tmp_path / "fp8.safetensors", "weight-scale", weight_group=PER_CHANNEL)
    checkpoint = load_checkpoint(tmp_path / "fp8.safetensors")
    plan = LoadPlan(Fp8Recipe.for_checkpoint(checkpoint.config, UserOptions(skip_layers="blocks.0.ffn")))
    model = TinyDiT(make_fp8_operations(StandInManualCast, plan))
    model.load_state_dict(checkpoint.state_dict, strict=False)
    ffn = model.blocks[0].ffn[0]
    assert ffn.weight.dtype == torch.bfloat16 and not ffn.is_fp8()
    assert rel_err(ffn.weight.float(), source["blocks.0.ffn.0.weight"]) < 0.06
    assert {layer.name: layer.reason for layer in plan.report.skipped}["blocks.0.ffn.0"] == "matched 'blocks.0.ffn'"


def test_deepcopy_of_loaded_model_works(tmp_path, source):
    model, _ = fp8_model(tmp_path, source)
    x = outlier_input(2, 3, 32, seed=56)
    assert torch.equal(copy.deepcopy(model)(x), model(x))


def test_offloaded_layer_takes_its_weight_through_comfyui_caster(tmp_path, source):
    """A layer left on the offload device gets its fp8 weight through ComfyUI's cast/uncast pair (stand-in here:
    the weight sits on the meta device, standing for "not on the compute device", and the caster brings it)."""
    model, _ = fp8_model(tmp_path, source, "weight-scale", per_channel=True)
    layer = model.blocks[0].attn.k
    x = outlier_input(2, 6, 32, seed=55)
    expected = model(x)
    stored = layer.weight
    calls = []

    def cast(module, inp):
        calls.append(("cast", module.weight.dtype, inp.dtype))
        return stored, module.bias, "handle"

    def uncast(module, weight, bias, handle):
        calls.append(("uncast", weight is stored, handle))

    layer.fp8_weight_caster = WeightCaster(cast, uncast)
    layer.weight = nn.Parameter(torch.empty_like(stored, device="meta"), requires_grad=False)
    assert torch.equal(model(x), expected)
    assert calls == [("cast", torch.float8_e4m3fn, x.dtype), ("uncast", True, "handle")]


def test_scale_copies_for_offloaded_layers_take_inference_tensors(tmp_path, source):
    """An offloaded layer copies its scales to the compute device once; under ComfyUI's inference_mode the scales
    are inference tensors (no version counter), and the copy must still be made once and reused."""
    with torch.inference_mode():
        model, _ = fp8_model(tmp_path, source)
    layer = model.blocks[0].attn.q
    scale = layer.weight_scale
    assert scale.is_inference()
    meta = torch.device("meta")
    first = layer._scale_on(scale, meta)
    assert first.device == meta and layer._scale_on(scale, meta) is first


@pytest.mark.parametrize(
    ("raised", "shown"),
    [
        (ValueError("blocks.3.q: bad scale"), "Load FP8 DiT: model.safetensors: blocks.3.q: bad scale"),
        (KeyError("weight"), "Load FP8 DiT: model.safetensors: KeyError: 'weight' (details in the console log)"),
    ],
)
def test_node_errors_are_one_line_naming_node_and_file(raised, shown):
    from nodes.loader import node_error

    with pytest.raises(RuntimeError) as caught:
        with node_error("Load FP8 DiT", "model.safetensors"):
            raise raised
    assert str(caught.value) == shown and caught.value.__cause__ is None and caught.value.__suppress_context__


@pytest.mark.parametrize("path", ["inplace", "new", "lowvram"])
def test_a_lora_of_nan_values_is_refused_naming_the_layer_and_the_weight_stays(tmp_path, source, path):
    """ComfyUI's patcher hands ``set_weight`` the patched real values; NaN there would be rounded into the fp8
    weight (stock ComfyUI does so silently)."""
    model, _ = fp8_model(tmp_path, source)
    layer = model.blocks[0].attn.q
    before, scale = layer.weight.detach().clone(), layer.weight_scale.detach().clone()
    patched = layer.convert_weight(layer.weight.float())
    patched[1, 2] = float("nan")
    patched[0, 0] = float("inf")
    options = {"inplace": {"inplace_update": True}, "new": {}, "lowvram": {"return_weight": True}}[path]
    with pytest.raises(ValueError, match=r"^blocks\.0\.attn\.q: the LoRA/patch .* gives 2 NaN/inf .* refused"):
        layer.set_weight(patched, **options)
    assert torch.equal(layer.weight.view(torch.uint8), before.view(torch.uint8))
    assert torch.equal(layer.current_weight_scale(), scale)


def test_node_error_passes_interrupt_and_out_of_memory_and_makes_any_other_error_one_line():
    from nodes.loader import node_error

    class InterruptProcessingException(Exception):  # ComfyUI's, matched by name
        pass

    for passing in (InterruptProcessingException(), torch.OutOfMemoryError("CUDA out of memory"), MemoryError()):
        with pytest.raises(type(passing)), node_error("Load FP8 DiT", "m.safetensors"):
            raise passing
    for raised in (
        RecursionError("maximum recursion depth"),
        KeyError("weight"),
        OSError("line one\nline two"),
        RuntimeError("torch says\n  more"),
    ):
        with pytest.raises(RuntimeError) as caught, node_error("Load FP8 DiT", "m.safetensors"):
            raise raised
        message = str(caught.value)
        assert message.startswith(f"Load FP8 DiT: m.safetensors: {type(raised).__name__}: ") and "\n" not in message


def test_auto_uses_partial_calibrated_input_scales(tmp_path, source, capsys):
    """A file from ``convert --calibrated`` whose calibration named one layer only: under auto that layer runs
    static on the scale written for it (0.0123, from the calibration file), the others learn theirs at run time;
    ``inspect`` says the same."""
    from fp8_quant.__main__ import main

    src = tmp_path / "bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in source.items()}, str(src))
    dst = tmp_path / "fp8.safetensors"
    convert_checkpoint(src, dst, "comfy-scaled", input_scales={"blocks.0.attn.q": torch.tensor(0.0123)})
    checkpoint = load_checkpoint(dst)
    plan = LoadPlan(Fp8Recipe.for_checkpoint(checkpoint.config, UserOptions()))
    model = TinyDiT(make_fp8_operations(StandInManualCast, plan))
    model.load_state_dict(checkpoint.state_dict, strict=False)
    calibrated, other = model.blocks[0].attn.q, model.blocks[0].attn.k
    assert calibrated.input_scale is not None
    assert calibrated.input_scale.item() == pytest.approx(0.0123, rel=1e-6)
    assert calibrated.fp8.method.config.activation_scheme == "static"
    assert other.input_scale is None and other.fp8.method.config.learns_activation_scales
    reasons = {layer.name: layer.reason for layer in plan.report.layers}
    assert "input scale" in reasons["blocks.0.attn.q"] and "input scale" not in reasons["blocks.0.attn.k"]
    assert main(["inspect", str(dst)]) == 0
    text = capsys.readouterr().out
    assert "not used" not in text and "those layers use it" in text
