"""8-bit attention's numerics on the CPU, through its emulation (the Triton kernel's own tests need a GPU:
tests/test_gpu_lowbit_attention.py). Reference: float64 softmax attention; inputs with a large K offset in a few
channels, as trained keys have."""

import math

import pytest
import torch
from helpers import rel_err

from fp8_quant import lowbit_attention as la
from fp8_quant.testing import attention_inputs


def reference(q, k, v):
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(logits, dim=-1) @ v.double()


@pytest.mark.parametrize("qk", la.QK_FORMATS)
def test_emulated_error_is_a_few_e4m3_roundings(qk):
    """P and V in e4m3 (about 2.4% each per value, averaged over the keys), QK in 8 bits after smoothing."""
    q, k, v = attention_inputs()
    error = rel_err(la.emulate(q, k, v, qk), reference(q, k, v))
    assert 1e-4 < error < 0.03, error


def test_int8_qk_is_more_accurate_than_e4m3_qk():
    """8-bit integers round smoothed (near-Gaussian) groups finer than e4m3's 3 mantissa bits."""
    q, k, v = attention_inputs(seed=1)
    q = q * 3  # peaked attention: the logits' rounding dominates
    expected = reference(q, k, v)
    assert rel_err(la.emulate(q, k, v, "int8"), expected) < 0.7 * rel_err(la.emulate(q, k, v, "fp8"), expected)


def test_smoothing_k_removes_the_offset_channels_from_its_range():
    """With K's mean over tokens left in, the offset channels would set every group's scale: the rounding of the
    other channels would be several times coarser. Smoothing leaves the softmax as it was."""
    q, k, v = attention_inputs(seed=2, k_offset=30.0)
    expected = reference(q, k, v)
    smoothed = la._round_groups(k - k.mean(dim=2, keepdim=True), la.K_GROUP, "int8")
    unsmoothed = la._round_groups(k, la.K_GROUP, "int8")
    centred = k - k.mean(dim=2, keepdim=True)
    # the logits' rounding error (q . error of each key), which is what the softmax sees
    error_smoothed = (q @ (smoothed - centred).transpose(-1, -2)).norm()
    error_unsmoothed = (q @ (unsmoothed - k).transpose(-1, -2)).norm()
    assert error_smoothed < 0.3 * error_unsmoothed, (error_smoothed, error_unsmoothed)
    assert rel_err(la.emulate(q, k, v, "int8"), expected) < 0.03


def test_groups_scale_separately_and_tails_are_handled():
    """A token count that is not a multiple of the groups, and one group much larger than the others: each group
    keeps its own scale, so the small ones are not rounded to zero."""
    q = attention_inputs(n_q=130, n_k=70, seed=3)[0]
    q[:, :, :128] *= 1000.0  # the first Q group
    rounded = la._round_groups(q, la.Q_GROUP, "int8")
    tail = q[:, :, 128:]
    assert rel_err(rounded[:, :, 128:], tail.double()) < 0.02
    assert rounded.shape == q.shape


def test_fp16_second_product_removes_the_e4m3_rounding_of_p_and_v():
    q, k, v = attention_inputs(seed=4)
    expected = reference(q, k, v)
    assert rel_err(la.emulate(q, k, v, "int8", "fp16"), expected) < 0.5 * rel_err(la.emulate(q, k, v, "int8"), expected)


def test_bad_formats_are_one_line_errors_naming_the_option():
    q, k, v = attention_inputs(n_q=8, n_k=8, d=64)
    with pytest.raises(ValueError, match="qk: 'int4'"):
        la.emulate(q, k, v, "int4")
    with pytest.raises(ValueError, match="pv: 'int8'"):
        la.emulate(q, k, v, "int8", "int8")


def test_smoothing_v_keeps_its_mean_out_of_the_rounding():
    """Softmax weights sum to one, so attention over V + c is attention over V, plus c. With V smoothed, a large
    offset in every channel leaves the rounding of what varies as it was; left in, the offset itself would be
    rounded (e4m3: about 2.4% of 5 per value) and summed over the keys."""
    q, k, v = attention_inputs(seed=4)
    expected = reference(q, k, v)
    error = rel_err(la.emulate(q, k, v), expected)
    shifted = la.emulate(q, k, v + 5.0).double() - 5.0
    assert rel_err(shifted, expected) < 1.2 * error + 1e-4, (rel_err(shifted, expected), error)
