"""The choice of fast fp8 accumulation (``kernels/fast_accum.py``), on the CPU: the fixed default rule, the
settings, and ``auto``'s timed choice with the timing replaced by given numbers (margin, two halves, size floor,
cache, compile and capture). The GPU tests in ``test_gpu.py`` run real GEMMs."""

import pytest
import torch

from fp8_quant.kernels import ChannelWiseScaledMMKernel, PerTensorScaledMMKernel, fast_accum, select_kernel
from fp8_quant.kernels.base import FP8ScaledMMLinearLayerConfig
from fp8_quant.scheme import PER_TENSOR, activation_key, weight_key

BIG = (torch.empty(14040, 13824), torch.empty(5120, 13824))  # Wan 14B's FFN down-projection: 2 TFLOP
SMALL = (torch.empty(512, 5120), torch.empty(5120, 5120))  # a DiT's text tokens: 27 GFLOP


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

        def __call__(self, run, flop, device):
            calls.append(flop)
            return self.halves or (self.ms, self.ms)

    timer = Timer()
    timer.calls = calls
    monkeypatch.setattr(fast_accum, "time_both", timer)
    yield timer
    fast_accum.forget()


def choose(x, weight, setting="auto", by_rule=False, out_dtype=torch.float16):
    return fast_accum.use_fast_accum(
        setting, "scaled_mm_tensor", by_rule, x, weight, out_dtype, True, lambda fast: None
    )


def test_default_rule_is_by_kernel_and_never_timed(timed, monkeypatch):
    monkeypatch.delenv(fast_accum.FAST_ACCUM_ENV, raising=False)
    setting = fast_accum.fast_accum_setting()
    assert setting == "rowwise"
    assert ChannelWiseScaledMMKernel.fast_accum_by_rule and not PerTensorScaledMMKernel.fast_accum_by_rule
    for shape in (BIG, SMALL):
        assert choose(*shape, setting=setting, by_rule=True) is True
        assert choose(*shape, setting=setting, by_rule=False) is False
    assert timed.calls == [] and fast_accum.decisions() == {}


def test_auto_chooses_fast_when_faster_by_the_margin_once_per_problem(timed):
    assert choose(*BIG) is True
    assert choose(*BIG) is True
    assert len(timed.calls) == 1  # timed once, then remembered
    assert timed.calls[0] == pytest.approx(2 * 14040 * 13824 * 5120)
    assert choose(*BIG, out_dtype=torch.bfloat16) is True
    assert len(timed.calls) == 2  # another output dtype is another problem
    assert list(fast_accum.decisions().values()) == [True, True]


def test_auto_near_tie_keeps_exact_accumulation(timed):
    timed.ms = (1.0, 0.95)  # 5% faster: under the margin
    assert choose(*BIG) is False
    fast_accum.forget()
    timed.ms = (1.0, 1.10)
    assert choose(*BIG) is False


def test_auto_halves_that_disagree_keep_exact_accumulation(timed):
    timed.halves = ((1.0, 0.90), (1.0, 0.99))  # faster in one half only: a near tie, as noise makes it
    assert choose(*BIG) is False
    fast_accum.forget()
    timed.halves = ((1.0, 0.90), (1.1, 0.95))
    assert choose(*BIG) is True


def test_auto_does_not_time_small_problems(timed):
    assert choose(*SMALL) is False
    assert timed.calls == []


def test_cpu_tensors_never_use_it(monkeypatch):
    fast_accum.forget()
    monkeypatch.setattr(fast_accum, "time_both", lambda run, flop, device: pytest.fail("timed a CPU GEMM"))
    for setting in fast_accum.FAST_ACCUM_CHOICES:
        assert choose(*BIG, setting=setting, by_rule=True) is False


def test_settings_on_and_off_skip_timing(timed):
    assert choose(*SMALL, setting="on") is True
    assert choose(*BIG, setting="off", by_rule=True) is False
    assert timed.calls == []


def test_auto_times_nothing_while_compiling_or_capturing(timed, monkeypatch):
    assert choose(*BIG) is True  # timed eagerly...
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert choose(*BIG) is False  # ...yet a compiled graph keeps exact accumulation: no guard on the token count
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    fast_accum.forget()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert choose(*BIG) is False
    assert len(timed.calls) == 1
    assert fast_accum.decisions() == {}  # nothing remembered from the capture: the next eager call times it


@pytest.mark.parametrize("setting", ["auto", "rowwise"])
def test_compiled_graphs_do_not_depend_on_the_token_count(timed, setting, monkeypatch):
    """A new resolution or frame count must not recompile the model because of this choice."""
    from torch._dynamo.testing import CompileCounter

    monkeypatch.setattr(fast_accum, "MIN_FLOP", 0)  # these small problems stand for large ones

    torch._dynamo.reset()
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def layer(x, weight):
        fast = fast_accum.use_fast_accum(setting, "scaled_mm_tensor", True, x, weight, x.dtype, False, None)
        return x @ weight.t() * (2.0 if fast else 1.0)

    weight = torch.randn(32, 64)
    for rows in (300, 400, 500, 600):
        x = torch.randn(rows, 64)
        expected = x @ weight.t() * (2.0 if setting == "rowwise" else 1.0)
        torch.testing.assert_close(layer(x, weight), expected)
    assert counter.frame_count <= 2  # the first size, then one dynamic-shape graph
    assert timed.calls == []
    torch._dynamo.reset()


def test_unknown_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv(fast_accum.FAST_ACCUM_ENV, "sometimes")
    with pytest.raises(ValueError, match="FP8_QUANT_FAST_ACCUM: unknown value 'sometimes'"):
        fast_accum.fast_accum_setting()
    config = FP8ScaledMMLinearLayerConfig(
        weight_key(torch.float8_e4m3fn, PER_TENSOR), activation_key(torch.float8_e4m3fn, True, PER_TENSOR), 64, 64
    )
    with pytest.raises(ValueError, match="FP8_QUANT_FAST_ACCUM"):
        select_kernel(config, "cpu", forced=PerTensorScaledMMKernel.name)


@pytest.mark.parametrize("value, expected", [(None, "rowwise"), ("", "rowwise"), ("AUTO", "auto"), (" off ", "off")])
def test_setting_is_read_case_blind(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(fast_accum.FAST_ACCUM_ENV, raising=False)
    else:
        monkeypatch.setenv(fast_accum.FAST_ACCUM_ENV, value)
    assert fast_accum.fast_accum_setting() == expected
