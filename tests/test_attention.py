"""The attention choice (which backend, and why) and the ComfyUI override's call shapes, on the CPU."""

import math

import pytest
import torch
import torch.nn.functional as F

from fp8_quant import attention
from fp8_quant.attention import AttentionChoice, AttentionDispatcher, in_guarded_step, parse_attention
from nodes.attention import make_override


def qkv(b=2, h=4, n_q=24, n_k=24, d=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=generator) for n in (n_q, n_k, n_k)]


def test_bad_choice_and_bad_environment_are_one_line_errors_naming_them(monkeypatch):
    with pytest.raises(ValueError, match=r"^attention: 'fastest' is not allowed; allowed values: \['auto'"):
        parse_attention("fastest")
    monkeypatch.setenv(attention.ATTENTION_ENV, "sage")
    with pytest.raises(ValueError, match=r"^FP8_QUANT_ATTENTION: 'sage' is not allowed"):
        AttentionDispatcher("auto")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({}, "cpu: ComfyUI's attention"),
        ({"mask": torch.zeros(24, 24)}, "an attention mask"),
    ],
)
def test_what_the_pack_does_not_take_goes_to_comfyui_with_the_reason(change, reason):
    q, k, v = (t.half() for t in qkv())
    dispatcher = AttentionDispatcher("auto")
    assert dispatcher.attend(q, k, v, **change) is None
    assert reason in dispatcher.describe()


def test_unsupported_names_each_case():
    """Every reason but the device is read from the call itself, so each is checked here on the CPU."""
    q, k, v = (t.half() for t in qkv())
    assert attention.unsupported(q, k, v, None, {}) == "cpu: ComfyUI's attention"
    assert "float32" in attention.unsupported(q.float(), k.float(), v.float(), None, {})
    assert "head dim 12" in attention.unsupported(*(t[..., :12] for t in (q, k, v)), None, {})
    assert "mismatched heads" in attention.unsupported(q, k[:, :2], v[:, :2], None, {})
    assert "custom softmax scale" in attention.unsupported(q, k, v, None, {"scale": 0.3})


class FakeTimer:
    def __init__(self, times):
        self.times, self.calls = times, []

    def __call__(self, name, q, k, v):
        self.calls.append(name)
        if self.times[name] is None:
            raise RuntimeError(f"{name} cannot run this")
        return self.times[name]


@pytest.mark.parametrize(
    ("times", "expected"),
    [
        ({"cudnn": 6.7, "flash": 11.4, "efficient": 23.0}, "cudnn"),  # an H200
        ({"cudnn": 10.0, "flash": 7.0, "efficient": 20.0}, "flash"),  # flash clearly faster
        ({"cudnn": 10.0, "flash": 9.7, "efficient": 20.0}, "cudnn"),  # 3% faster: the default stays
        ({"cudnn": None, "flash": 9.0, "efficient": 8.0}, "efficient"),  # no cuDNN: flash is the default to beat
    ],
)
def test_the_fastest_measured_backend_is_chosen_once_per_problem(times, expected):
    q, k, v = qkv()
    timer = FakeTimer(times)
    dispatcher = AttentionDispatcher("auto", timer=timer)
    assert dispatcher._fastest(q, k, v) == expected
    assert dispatcher._fastest(q, k, v) == expected
    assert timer.calls == list(attention.DEFAULT_ORDER)  # timed once, not again
    other = qkv(n_q=48)
    dispatcher._fastest(*other)
    assert len(timer.calls) == 2 * len(attention.DEFAULT_ORDER)  # another shape is timed on its own
    assert f"{expected}: fastest measured" in dispatcher.describe()


def test_nothing_is_timed_while_compiling(monkeypatch):
    q, k, v = qkv()
    timer = FakeTimer({"cudnn": 9.0, "flash": 1.0, "efficient": 9.0})
    dispatcher = AttentionDispatcher("auto", timer=timer)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert dispatcher._fastest(q, k, v) == attention.DEFAULT_ORDER[0]
    assert timer.calls == []


def test_compiling_is_asked_before_capturing(monkeypatch):
    """Dynamo cannot trace ``torch.cuda.is_current_stream_capturing`` (it breaks the graph at every attention call
    of a compiled CUDA model), so inside a trace it must never be asked."""

    def untraceable() -> bool:
        raise AssertionError("is_current_stream_capturing asked inside a trace")

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", untraceable)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not attention.may_time(torch.device("cuda"))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not attention.may_time(torch.device("cuda"))
    assert attention.may_time(torch.device("cpu"))


def test_guarded_steps_are_the_first_and_last_by_sigma():
    sample = torch.tensor([1.0, 0.8, 0.5, 0.2, 0.05, 0.0])
    assert in_guarded_step(torch.tensor([1.0]), sample, 1)
    assert in_guarded_step(torch.tensor([0.05]), sample, 1)  # the last sigma above 0
    assert not in_guarded_step(torch.tensor([0.5]), sample, 1)
    assert in_guarded_step(torch.tensor([0.8]), sample, 2)
    assert not in_guarded_step(torch.tensor([0.8]), None, 1)
    assert not in_guarded_step(torch.tensor([1.0]), sample, 0)


def comfy_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                    **kwargs):  # fmt: skip
    """ComfyUI's attention_pytorch call shape, computed independently with torch's math attention."""
    if not skip_reshape:
        b, _, inner = q.shape
        q, k, v = (t.view(b, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if skip_output_reshape:
        return out
    return out.transpose(1, 2).reshape(out.shape[0], -1, out.shape[1] * out.shape[3])


class ExactDispatcher(AttentionDispatcher):
    """Stands in for a GPU backend: the math softmax attention in float64, so a reshaping mistake shows."""

    def attend(self, q, k, v, mask=None, low_precision=True, **extra):
        self.calls = getattr(self, "calls", 0) + 1
        logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
        return (torch.softmax(logits, -1) @ v.double()).to(q.dtype)


@pytest.mark.parametrize("skip_reshape", [False, True])
@pytest.mark.parametrize("skip_output_reshape", [False, True])
def test_override_takes_comfyuis_call_shapes_self_and_cross_attention(skip_reshape, skip_output_reshape):
    """Self-attention and cross-attention with 512 keys, a batch of 2 with different contexts."""
    heads, d = 4, 32
    for n_k in (40, 512):
        q, k, v = qkv(b=2, h=heads, n_q=40, n_k=n_k, d=d, seed=n_k)
        k[1] += 2.0  # the second context differs
        if not skip_reshape:
            q, k, v = (t.transpose(1, 2).reshape(2, t.shape[2], heads * d) for t in (q, k, v))
        dispatcher = ExactDispatcher("auto")
        override = make_override(dispatcher)
        options = {"skip_reshape": skip_reshape, "skip_output_reshape": skip_output_reshape}
        got = override(comfy_attention, q, k, v, heads, **options)
        expected = comfy_attention(q, k, v, heads, **options)
        assert dispatcher.calls == 1
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_override_falls_back_to_comfyuis_function_with_every_argument():
    q, k, v = qkv()
    seen = {}

    def func(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs)
        return "comfy's"

    override = make_override(AttentionDispatcher("auto"))  # CPU tensors: ComfyUI's attention
    flat = [t.transpose(1, 2).reshape(2, 24, 256) for t in (q, k, v)]
    assert override(func, *flat, 4, mask=None, transformer_options={"x": 1}) == "comfy's"
    assert seen["args"][3] == 4 and seen["kwargs"]["transformer_options"] == {"x": 1}


def test_comfy_choice_never_touches_the_call():
    q, k, v = qkv()
    dispatcher = AttentionDispatcher(AttentionChoice.COMFY)
    assert dispatcher.attend(q, k, v) is None
    assert dispatcher.used == {}
