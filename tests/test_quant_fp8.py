import pytest
import torch
from helpers import mean_row_rel_err, outlier_input, rel_err

from fp8_quant import QuantFP8, quantize_input_dynamic, quantize_input_static
from fp8_quant.fp8_utils import check_scale, dequantize, quantize_weight
from fp8_quant.scheme import (
    BLOCK_128,
    PER_CHANNEL,
    PER_TENSOR,
    PER_TOKEN,
    GroupShape,
    kFp8DynamicTokenSym,
    weight_scale_shape,
)


@pytest.mark.parametrize("shape", [(64,), (7, 64), (2, 5, 64), (2, 3, 4, 64)])
def test_per_token_any_rank(shape):
    x = outlier_input(*shape, seed=3)
    q, scale = QuantFP8(False, PER_TOKEN)(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert scale.shape == (*shape[:-1], 1)
    assert rel_err(q.float() * scale, x) < 0.04


def test_per_tensor_scale_is_scalar():
    x = outlier_input(5, 64, seed=4)
    q, scale = QuantFP8(False, PER_TENSOR)(x)
    assert scale.shape == ()
    assert rel_err(q.float() * scale, x) < 0.2


def test_per_token_beats_per_tensor_on_outliers():
    x = outlier_input(64, 256, seed=5)
    q_tok, s_tok = quantize_input_dynamic(x, per_token=True)
    q_ten, s_ten = quantize_input_dynamic(x, per_token=False)
    err_tok = mean_row_rel_err(q_tok.float() * s_tok, x)
    err_ten = mean_row_rel_err(q_ten.float() * s_ten, x)
    assert err_tok < 0.8 * err_ten, (err_tok, err_ten)


def test_all_zero_rows_survive():
    x = outlier_input(4, 32, seed=6)
    x[1] = 0
    q, scale = QuantFP8(False, PER_TOKEN)(x)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(q[1].float(), torch.zeros(32))
    q, scale = QuantFP8(False, PER_TENSOR)(torch.zeros(3, 16))
    assert torch.isfinite(q.float()).all() and scale > 0


def test_static_clamps_instead_of_overflowing():
    x = torch.tensor([[1.0, -1000.0, 1000.0, 0.5]])
    q, _ = QuantFP8(True, PER_TENSOR)(x, torch.tensor(1.0))
    assert torch.equal(q.float(), torch.tensor([[1.0, -448.0, 448.0, 0.5]]))
    assert torch.equal(quantize_input_static(x, torch.tensor(1.0)).float(), q.float())


def test_static_needs_scale_and_is_per_tensor():
    with pytest.raises(ValueError, match="scale"):
        QuantFP8(True, PER_TENSOR)(torch.ones(2, 16))
    with pytest.raises(ValueError, match="per-tensor"):
        QuantFP8(True, PER_TOKEN)


def test_from_key_and_e5m2():
    assert QuantFP8.from_key(kFp8DynamicTokenSym).per_token
    x = outlier_input(8, 64, seed=7)
    q, scale = QuantFP8(False, PER_TOKEN, torch.float8_e5m2)(x)
    assert q.dtype == torch.float8_e5m2
    assert rel_err(q.float() * scale, x) < 0.08


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    x = outlier_input(6, 48, seed=8, dtype=dtype)
    q, scale = QuantFP8(False, PER_TOKEN)(x)
    assert scale.dtype == torch.float32
    assert rel_err(q.float() * scale, x.float()) < 0.04


@pytest.mark.parametrize(
    "group, scale_shape, bound",
    [(PER_CHANNEL, (96,), 0.04), (PER_TENSOR, (), 0.3), (BLOCK_128, (1, 1), 0.3), (GroupShape(32, 16), (6, 2), 0.04)],
)
def test_quantize_weight(group, scale_shape, bound):
    weight = outlier_input(96, 64, seed=9)
    q, scale = quantize_weight(weight, group=group)
    assert scale.shape == scale_shape == weight_scale_shape(group, *weight.shape)
    assert rel_err(dequantize(q, scale, group=group), weight) < bound


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0])
def test_check_scale_rejects(bad):
    with pytest.raises(ValueError, match="blocks.0.q.weight_scale"):
        check_scale(torch.tensor([1.0, bad]), "blocks.0.q.weight_scale")
