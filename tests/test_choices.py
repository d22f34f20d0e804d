"""The parse/format table (``fp8_quant.choices``) and ``config.resolve``, where a user's choices meet a file's
config and a context's defaults. Expected values are written out here (names, typed values, error lines as users
have always seen them), not read from the table under test."""

import pytest
import torch

from fp8_quant.choices import (
    ACTIVATION_GRANULARITY,
    ACTIVATION_SCHEME,
    OUTPUT_DTYPE,
    QUANT_FORMAT,
    USER_ACTIVATION_GRANULARITIES,
    USER_ACTIVATION_SCHEMES,
    WEIGHT_DTYPE,
    WEIGHT_GRANULARITIES,
    WEIGHT_GRANULARITY_OR_AUTO,
    ActivationScheme,
    QuantFormat,
)
from fp8_quant.config import (
    SENSITIVE_LAYER_PATTERNS,
    Fp8Config,
    Int8Config,
    UserOptions,
    parse_output_dtype,
    parse_quant_format,
    parse_weight_dtype,
    resolve,
)
from fp8_quant.scheme import BLOCK_128, PER_CHANNEL, PER_TENSOR, PER_TOKEN, GroupShape
from fp8_quant.text_encoder import RECIPE_DEFAULTS, RECIPES, text_encoder_config
from nodes.widgets import loader_optional_inputs, text_encoder_optional_inputs

NAMES = {
    "activation_scheme": {
        "dynamic": ActivationScheme.DYNAMIC,
        "static": ActivationScheme.STATIC,
        "calibrated": ActivationScheme.CALIBRATED,
        "none": ActivationScheme.NONE,
    },
    "weight_granularity": {
        "auto": None,
        "channel": GroupShape(-1, 1),
        "tensor": GroupShape(-1, -1),
        "block": GroupShape(128, 128),
    },
    "activation_granularity": {"tensor": GroupShape(-1, -1), "token": GroupShape(1, -1), "group": GroupShape(1, 128)},
    "weight_dtype": {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2},
    "output_dtype": {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32},
    "quant_format": {"auto": QuantFormat.AUTO, "fp8": QuantFormat.FP8, "int8_rotated": QuantFormat.INT8_ROTATED},
}
CHOICES = {
    "activation_scheme": ACTIVATION_SCHEME,
    "weight_granularity": WEIGHT_GRANULARITY_OR_AUTO,
    "activation_granularity": ACTIVATION_GRANULARITY,
    "weight_dtype": WEIGHT_DTYPE,
    "output_dtype": OUTPUT_DTYPE,
    "quant_format": QUANT_FORMAT,
}


@pytest.mark.parametrize("option", list(NAMES))
def test_every_name_parses_to_its_value_and_formats_back(option):
    choice = CHOICES[option]
    assert choice.names == tuple(NAMES[option])
    for name, typed in NAMES[option].items():
        parsed = choice.parse(name)
        assert parsed == typed and type(parsed) is type(typed)
        assert choice.parse(parsed) is parsed  # a typed value passes as it is
        assert choice.format(parsed) == name


@pytest.mark.parametrize("option", ["activation_scheme", "weight_granularity", "activation_granularity"])
def test_every_config_name_round_trips_through_a_files_dict(option):
    for name in NAMES[option]:
        values = {option: name}
        if option == "activation_scheme" and name == "static":
            values["activation_granularity"] = "tensor"
        config = Fp8Config.from_dict(values)
        assert config.to_dict()[option] == name
        assert Fp8Config.from_dict(config.to_dict()) == config


def test_dtype_spellings_users_write():
    assert parse_weight_dtype("E4M3") is torch.float8_e4m3fn
    assert parse_weight_dtype("torch.float8_e5m2") is torch.float8_e5m2
    assert parse_weight_dtype("fp8_e5m2") is torch.float8_e5m2
    assert parse_output_dtype("bf16") is torch.bfloat16
    assert parse_output_dtype("half") is torch.float16
    assert parse_output_dtype("auto") is None
    assert parse_quant_format("INT8") is QuantFormat.INT8_ROTATED
    assert parse_quant_format("int8-convrot").value == "int8_rotated"


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Fp8Config(activation_scheme="bogus"),
         "activation_scheme: 'bogus' is not allowed; allowed values: ['dynamic', 'static', 'calibrated', 'none']"),
        (lambda: Fp8Config.from_dict({"weight_granularity": "Rows"}),
         "weight_granularity: 'rows' is not allowed; allowed values: ['auto', 'channel', 'tensor', 'block']"),
        (lambda: Fp8Config(activation_granularity="row"),
         "activation_granularity: 'row' is not allowed; allowed values: ['tensor', 'token', 'group']"),
        (lambda: Fp8Config.from_dict({"weight_dtype": "fp16"}),
         "weight_dtype: 'fp16' is not allowed; allowed values: ['float8_e4m3fn', 'float8_e5m2']"),
        (lambda: Fp8Config(weight_dtype=torch.float16),
         "weight_dtype: torch.float16 is not allowed; allowed values: ['float8_e4m3fn', 'float8_e5m2']"),
        (lambda: Fp8Config.from_dict({"output_dtype": "int8"}),
         "output_dtype: 'int8' is not allowed; allowed values: ['auto', 'bfloat16', 'float16', 'float32']"),
        (lambda: Fp8Config(activation_scheme="static", activation_granularity="token"),
         "activation_granularity: a static activation scale is one calibrated scalar, so it must be 'tensor' (got "
         "'token'); use activation_scheme='dynamic' for per-token scales"),
        (lambda: UserOptions(activation_scheme="calibrated"),
         "activation_scheme: 'calibrated' is not allowed; allowed values: ['auto', 'dynamic', 'static', 'none']"),
        (lambda: UserOptions(quant_format="int4"),
         "quant_format: 'int4' is not allowed; allowed values: ['auto', 'fp8', 'int8_rotated']"),
        (lambda: UserOptions(weight_granularity="rows"),
         "weight_granularity: 'rows' is not allowed; allowed values: ['auto', 'channel', 'tensor', 'block']"),
    ],
)  # fmt: skip
def test_bad_values_are_one_line_naming_the_option_and_the_allowed_values(build, message):
    with pytest.raises(ValueError) as raised:
        build()
    assert str(raised.value) == message


def test_widgets_offer_the_names_users_may_pick():
    """One list each: the widgets show the table's names, ``auto`` first; ``calibrated`` is what auto stands for."""
    for inputs in (loader_optional_inputs(), text_encoder_optional_inputs()):
        assert inputs["activation_scheme"][0] == ["auto", "dynamic", "static", "none"]
        assert inputs["activation_granularity"][0] == ["auto", "tensor", "token", "group"]
        assert inputs["weight_granularity"][0] == ["auto", "channel", "tensor", "block"]
    assert USER_ACTIVATION_SCHEMES == ("auto", "dynamic", "static", "none")
    assert USER_ACTIVATION_GRANULARITIES == ("auto", "tensor", "token", "group")
    assert WEIGHT_GRANULARITIES == ("auto", "channel", "tensor", "block")


def test_resolve_on_the_fly_auto_is_calibrated_per_layer_with_the_sensitive_layers_kept():
    config = resolve(UserOptions(skip_layers="blocks.3"))
    assert config.activation_scheme is ActivationScheme.CALIBRATED
    assert config.activation_granularity == PER_TOKEN and config.weight_granularity is None
    assert config.ignored_layers == (*SENSITIVE_LAYER_PATTERNS, "blocks.3")
    assert not config.round_activations_on_dequant  # nobody asked for a scheme: nothing rounded on dequant


def test_resolve_a_users_explicit_choice_rounds_on_dequant_and_picks_its_granularity():
    static = resolve(UserOptions(activation_scheme="static", weight_granularity="block"))
    assert static.activation_scheme is ActivationScheme.STATIC and static.activation_granularity == PER_TENSOR
    assert static.weight_granularity == BLOCK_128 and static.round_activations_on_dequant
    dynamic = resolve(UserOptions(activation_scheme="dynamic", activation_granularity="tensor"))
    assert dynamic.activation_granularity == PER_TENSOR and dynamic.activation_scheme is ActivationScheme.DYNAMIC


def test_resolve_a_files_config_keeps_its_weights_and_its_static_scales_under_auto():
    file_config = Fp8Config(weight_dtype=torch.float8_e5m2, weight_granularity="tensor", activation_scheme="static",
                            activation_granularity="tensor", output_dtype=torch.float16)  # fmt: skip
    kept = resolve(UserOptions(weight_granularity="block"), file_config)
    assert kept.weight_granularity == PER_TENSOR and kept.weight_dtype is torch.float8_e5m2  # the file's weights
    assert kept.output_dtype is torch.float16 and kept.ignored_layers == ()  # a file's author chose what to quantize
    assert kept.activation_scheme is ActivationScheme.STATIC and kept.activation_granularity == PER_TENSOR
    dynamic_file = Fp8Config(weight_granularity="channel")
    assert resolve(UserOptions(), dynamic_file).activation_scheme is ActivationScheme.CALIBRATED
    none = resolve(UserOptions(activation_scheme="none"), file_config)
    assert not none.quantizes_activations and none.weight_granularity == PER_TENSOR


def test_resolve_int8_on_the_fly():
    config = resolve(UserOptions(quant_format="int8_rotated", weight_granularity="tensor"))
    assert isinstance(config, Int8Config) and config.rotation_group == 256 and config.weight_granularity == PER_TENSOR
    assert config.activation_scheme is ActivationScheme.DYNAMIC and config.activation_granularity.value == "token"
    grouped = resolve(UserOptions(quant_format="int8_rotated", activation_granularity="group"))
    assert grouped.grouped_scales and grouped.per_channel and "per-channel and rotation group" in grouped.describe()
    weight_only = resolve(UserOptions(quant_format="int8_rotated", activation_scheme="none"))
    assert weight_only.activation_scheme is ActivationScheme.NONE and not weight_only.quantizes_activations


def test_text_encoder_recipes_are_a_defaults_table():
    assert RECIPES == ("quality", "speed", "plain") and set(RECIPE_DEFAULTS) == set(RECIPES)
    quality = text_encoder_config(UserOptions(), "quality")
    assert isinstance(quality, Int8Config) and quality.rotation_group is None
    assert not quality.quantizes_activations and quality.weight_granularity == PER_CHANNEL
    assert quality.ignored_layers == SENSITIVE_LAYER_PATTERNS
    quality_fp8 = text_encoder_config(UserOptions(), "quality", weight_only_format="fp8")
    assert isinstance(quality_fp8, Fp8Config) and not quality_fp8.quantizes_activations
    assert quality_fp8.weight_granularity == PER_CHANNEL and not quality_fp8.round_activations_on_dequant
    for recipe in ("speed", "plain"):
        config = text_encoder_config(UserOptions(), recipe)
        assert config.activation_scheme is ActivationScheme.DYNAMIC and config.activation_granularity == PER_TOKEN
        assert config.weight_granularity == PER_CHANNEL
        assert config.round_activations_on_dequant  # the reported error is the FP8 GPU's, even under auto
    static = text_encoder_config(UserOptions(activation_scheme="static"), "quality")
    assert isinstance(static, Fp8Config) and static.activation_granularity == PER_TENSOR
    block = text_encoder_config(UserOptions(weight_granularity="block", activation_scheme="none"), "plain")
    assert isinstance(block, Fp8Config) and block.weight_granularity == BLOCK_128  # int8 has no blocks
    assert text_encoder_config(UserOptions(weight_granularity="tensor"), "quality").weight_granularity == PER_TENSOR


def test_a_files_summary_says_what_its_layers_run(tmp_path):
    """An mxfp8 file's config names its finest granularity ("block"); the summary says what the layers run."""
    from checkpoints import LAYERS, source_weights, write_mxfp8

    from fp8_quant import Fp8Recipe
    from fp8_quant.formats import load_checkpoint
    from fp8_quant.layer_loader import load_layer
    from fp8_quant.report import Fp8Report

    checkpoint = load_checkpoint(write_mxfp8(tmp_path / "mx.safetensors", source_weights()))
    recipe = Fp8Recipe.for_checkpoint(checkpoint.config, UserOptions())
    report = Fp8Report(recipe.config)
    for name, (rows, cols) in LAYERS.items():
        weight = checkpoint.state_dict[f"{name}.weight"]
        scale = checkpoint.state_dict[f"{name}.weight_scale"]
        report.layers.append(load_layer(torch.nn.Linear(cols, rows), name, recipe, weight, scale))
    # Layers of 32 inputs hold one group per row: per channel.
    assert ("weights fp8 e4m3, per-channel (2 layers) / mxfp8 (fp8 e4m3, groups of 32 per channel, power-of-two "
            "scales) (1 layer);") in report.summary()
    assert "128x128" not in report.summary()
