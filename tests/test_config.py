import pytest
import torch

from fp8_quant import SENSITIVE_LAYER_PATTERNS, Fp8Config, is_layer_skipped
from fp8_quant.config import matching_pattern


def test_defaults_are_the_recommended_scheme():
    config = Fp8Config()
    assert config.weight_dtype == torch.float8_e4m3fn
    names = config.to_dict()  # the typed fields, by the names files and widgets write
    assert (names["weight_granularity"], names["activation_scheme"], names["activation_granularity"]) == (
        "channel", "dynamic", "token")
    assert str(config.activation_quant_key) == "fp8 e4m3, per-token, dynamic"
    assert str(config.weight_quant_key) == "fp8 e4m3, per-channel"


def test_from_dict_round_trip_and_aliases():
    config = Fp8Config.from_dict(
        {
            "weight_dtype": "e5m2",
            "weight_granularity": "Tensor",
            "activation_scheme": "static",
            "activation_granularity": "tensor",
            "ignored_layers": "head, *norm*",
            "output_dtype": "bf16",
        }
    )
    assert config.weight_dtype == torch.float8_e5m2
    assert config.ignored_layers == ("head", "*norm*")
    assert config.output_dtype == torch.bfloat16
    assert Fp8Config.from_dict(config.to_dict()) == config
    assert Fp8Config.from_dict({"weight_dtype": "torch.float8_e4m3fn"}).weight_dtype == torch.float8_e4m3fn


@pytest.mark.parametrize(
    "values, field_name",
    [
        ({"weight_dtype": "int8"}, "weight_dtype"),
        ({"weight_granularity": "blocky"}, "weight_granularity"),
        ({"activation_scheme": "smooth"}, "activation_scheme"),
        ({"activation_granularity": "channel"}, "activation_granularity"),
        ({"output_dtype": "int4"}, "output_dtype"),
        ({"activation_scheme": "static", "activation_granularity": "token"}, "activation_granularity"),
        ({"ignored_layers": ["re:("]}, "ignored_layers"),
        ({"weight_scale": 1}, "weight_scale"),
    ],
)
def test_bad_values_name_the_field(values, field_name):
    with pytest.raises(ValueError, match=field_name):
        Fp8Config.from_dict(values)


def test_bad_value_lists_allowed_values():
    with pytest.raises(ValueError, match="'channel', 'tensor'"):
        Fp8Config(weight_granularity="row")


@pytest.mark.parametrize(
    "name, patterns, skipped",
    [
        ("head", ["head"], True),
        ("blocks.1.attn.q", ["blocks.1"], True),
        ("blocks.10.attn.q", ["blocks.1"], False),
        ("blocks.3.norm_q", ["*norm*"], True),
        ("blocks.3.ffn.2", ["blocks.*.ffn.2"], True),
        ("blocks.3.ffn.0", ["blocks.*.ffn.2"], False),
        ("blocks.7.cross_attn.k", ["re:cross_attn\\.(k|v)$"], True),
        ("blocks.7.cross_attn.q", ["re:cross_attn\\.(k|v)$"], False),
        ("anything", [], False),
    ],
)
def test_is_layer_skipped(name, patterns, skipped):
    assert is_layer_skipped(name, patterns) is skipped
    assert is_layer_skipped(name, Fp8Config(ignored_layers=tuple(patterns))) is skipped


def test_sensitive_patterns_cover_dit_layers_but_not_blocks():
    for name in ["time_embedding.0", "blocks.0.modulation", "head.head", "final_layer.linear", "norm_out.linear"]:
        assert matching_pattern(name, SENSITIVE_LAYER_PATTERNS), name
    block_layers = [
        "blocks.0.self_attn.q",
        "blocks.0.ffn.0",
        "double_blocks.3.img_attn.qkv",
        "encoder.block.0.layer.1.DenseReluDense.wi_0",
    ]
    for name in block_layers:
        assert not matching_pattern(name, SENSITIVE_LAYER_PATTERNS), name
