"""The per-problem choice of cuBLASLt's fast fp8 accumulation (``kernels/fast_accum.py``), on the CPU: the timing
is replaced by given numbers, so the rule (margin, size floor, cache, compile and capture, the setting) is what is
tested. The GPU test in ``test_gpu.py`` times real GEMMs."""

import pytest
import torch

from fp8_quant.kernels import PerTensorScaledMMKernel, fast_accum, select_kernel
from fp8_quant.kernels.base import FP8ScaledMMLinearLayerConfig
from fp8_quant.scheme import PER_TENSOR, activation_key, weight_key

BIG = (torch.empty(14040, 13824), torch.empty(5120, 13824))  # Wan 14B's FFN down-projection: 2 TFLOP
SMALL = (torch.empty(256, 4096), torch.empty(4096, 4096))  # a text encoder's attention: 8.6 GFLOP


@pytest.fixture
def timed(monkeypatch):
    """Pretend the tensors are on a GPU and time the two ways as ``timed.ms`` says; count the timings."""
    fast_accum.forget()
    monkeypatch.setattr(fast_accum, "on_gpu", lambda x: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    calls = []

    class Timer:
        ms = (1.0, 0.9)  # exact, fast: the same in both halves unless ``halves`` says otherwise
        halves = None

        def __call__(self, run, flop):
            calls.append(flop)
            return self.halves or (self.ms, self.ms)

    timer = Timer()
    timer.calls = calls
    monkeypatch.setattr(fast_accum, "time_both", timer)
    yield timer
    fast_accum.forget()


def choose(x, weight, setting="auto", out_dtype=torch.float16):
    return fast_accum.use_fast_accum(setting, "scaled_mm_tensor", x, weight, out_dtype, True, lambda fast: None)


def test_faster_by_the_margin_is_chosen_once_per_problem(timed):
    assert choose(*BIG) is True
    assert choose(*BIG) is True
    assert len(timed.calls) == 1  # timed once, then remembered
    assert timed.calls[0] == pytest.approx(2 * 14040 * 13824 * 5120)
    assert choose(*BIG, out_dtype=torch.bfloat16) is True
    assert len(timed.calls) == 2  # another output dtype is another problem
    assert list(fast_accum.decisions().values()) == [True, True]


def test_near_tie_keeps_exact_accumulation(timed):
    timed.ms = (1.0, 0.95)  # 5% faster: under the margin, so the output stays the same from run to run
    assert choose(*BIG) is False
    timed.ms = (1.0, 1.10)
    fast_accum.forget()
    assert choose(*BIG) is False


def test_halves_that_disagree_keep_exact_accumulation(timed):
    timed.halves = ((1.0, 0.90), (1.0, 0.99))  # faster in one half only: a near tie, as noise makes it
    assert choose(*BIG) is False
    fast_accum.forget()
    timed.halves = ((1.0, 0.90), (1.1, 0.95))
    assert choose(*BIG) is True


def test_small_problems_are_not_timed(timed):
    assert choose(*SMALL) is False
    assert timed.calls == []


def test_cpu_tensors_never_use_it(monkeypatch):
    fast_accum.forget()
    monkeypatch.setattr(fast_accum, "time_both", lambda run, flop: pytest.fail("timed a CPU GEMM"))
    assert choose(*BIG) is False
    assert choose(*BIG, setting="on") is False


def test_settings_on_and_off_skip_timing(timed):
    assert choose(*SMALL, setting="on") is True
    assert choose(*BIG, setting="off") is False
    assert timed.calls == []


def test_not_timed_while_compiling_or_capturing(timed, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert choose(*BIG) is False
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert choose(*BIG) is False
    assert timed.calls == []
    assert fast_accum.decisions() == {}  # nothing remembered: the next eager call times it


def test_a_problem_timed_eagerly_keeps_its_choice_when_compiled(timed, monkeypatch):
    assert choose(*BIG) is True
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert choose(*BIG) is True


def test_unknown_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv(fast_accum.FAST_ACCUM_ENV, "sometimes")
    with pytest.raises(ValueError, match="FP8_QUANT_FAST_ACCUM: unknown value 'sometimes'"):
        fast_accum.fast_accum_setting()
    config = FP8ScaledMMLinearLayerConfig(
        weight_key(torch.float8_e4m3fn, PER_TENSOR), activation_key(torch.float8_e4m3fn, True, PER_TENSOR), 64, 64
    )
    with pytest.raises(ValueError, match="FP8_QUANT_FAST_ACCUM"):
        select_kernel(config, "cpu", forced=PerTensorScaledMMKernel.name)


@pytest.mark.parametrize("value, expected", [(None, "auto"), ("ON", "on"), (" off ", "off")])
def test_setting_is_read_case_blind(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(fast_accum.FAST_ACCUM_ENV, raising=False)
    else:
        monkeypatch.setenv(fast_accum.FAST_ACCUM_ENV, value)
    assert fast_accum.fast_accum_setting() == expected
