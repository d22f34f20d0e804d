"""CPU: how the quantizers bind the one-launch linear (``launcher``) in place of the row quantizer, with no GPU (the
launch is a stand-in that records its call; tests/test_gpu_one_launch.py runs the real one): the mode and layer
width it is made for, the weight a call hands it, what comes back, and where the quantizer refuses (groups, the
eager path) so that the prepared call keeps its two launches. The work limit sits where the GPU measurements put it."""

from __future__ import annotations

import torch

from fp8_quant.kernels.scaled_mm import one_launch_work
from fp8_quant.quant_fp8 import QuantFP8
from fp8_quant.scheme import PER_TENSOR, PER_TOKEN, PER_TOKEN_GROUP_128

CUDA = torch.device("cuda")  # nothing is put on it: the stand-in launch never touches a device


class StandIn:
    made: list[tuple] = []  # noqa: RUF012

    def __init__(self, mode, x_dtype, dtype, cols, device, margin=1.0, row_scales=False) -> None:
        StandIn.made.append((mode, x_dtype, dtype, cols, device, margin))
        self.calls: list[tuple] = []
        StandIn.last = self

    def __call__(self, x2d, buffers, *more):
        self.calls.append((x2d.shape, buffers, more))
        return "out", None


def triton_quantizer(static: bool, group=PER_TOKEN) -> QuantFP8:
    quant = QuantFP8(static, group)
    quant.use_triton = True  # as on a CUDA machine with Triton
    return quant


def test_dynamic_per_token_binds_the_launcher_and_hands_it_the_weight():
    from fp8_quant import quant_triton

    StandIn.made.clear()
    quantize = triton_quantizer(False).bind(torch.bfloat16, 64, CUDA, row_scales=True, launcher=StandIn)
    weight = torch.zeros(32, 64)
    out, scale = quantize(torch.ones(2, 3, 64), weight)
    assert (out, scale) == ("out", None)
    assert StandIn.made == [(quant_triton.DYNAMIC, torch.bfloat16, torch.float8_e4m3fn, 64, CUDA, 1.0)]
    shape, buffers, more = StandIn.last.calls[0]
    assert shape == (6, 64) and buffers == (None, None, None, None) and more[0] is weight


def test_running_binds_the_launcher_with_its_margin_and_buffers():
    from fp8_quant import quant_triton

    StandIn.made.clear()
    quantize = triton_quantizer(True, PER_TENSOR).bind_running(torch.float16, 48, CUDA, 1.25, True, StandIn)
    buffers = tuple(torch.zeros(1) for _ in range(4))
    weight = torch.zeros(16, 48)
    assert quantize(torch.ones(5, 48), buffers, weight) == ("out", None)
    assert StandIn.made == [(quant_triton.RUNNING, torch.float16, torch.float8_e4m3fn, 48, CUDA, 1.25)]
    assert StandIn.last.calls[0][1] is buffers and StandIn.last.calls[0][2][0] is weight


def test_a_static_scale_goes_to_the_launcher_as_its_buffer():
    quantize = triton_quantizer(True, PER_TENSOR).bind(torch.bfloat16, 64, torch.device("cpu"), torch.tensor(0.5))
    assert quantize is not None  # the eager path on the CPU: a bound call without the launcher
    assert triton_quantizer(True, PER_TENSOR).bind(torch.bfloat16, 64, torch.device("cpu"), torch.tensor(0.5),
                                                   launcher=StandIn) is None  # fmt: skip


def test_quantizers_that_would_not_launch_the_row_kernel_refuse_the_launcher():
    assert triton_quantizer(False, PER_TOKEN_GROUP_128).bind(torch.bfloat16, 256, CUDA, launcher=StandIn) is None
    assert triton_quantizer(False, PER_TENSOR).bind(torch.bfloat16, 256, CUDA, launcher=StandIn) is None
    eager = QuantFP8(False, PER_TOKEN, use_triton=False)
    assert eager.bind(torch.bfloat16, 256, CUDA, launcher=StandIn) is None
    assert eager.bind_running(torch.bfloat16, 256, CUDA, 1.0, True, StandIn) is None


def test_the_work_limit_sits_where_the_h200_measurements_crossed_over():
    # bench/results/one-launch-tiles-h200.json and linear-host-parts-h200.json: at 5120 wide the one launch's GPU
    # time (34 us at 64 rows, 53 at 256) against the two launches' host time (~45 us): faster at 64 rows, slower at
    # 256; at 3072 wide (0.36x the work per row) faster up to 256 rows, slower at 1024.
    assert 64 * 5120 * 5120 <= one_launch_work[0] < 256 * 5120 * 5120
    assert 256 * 3072 * 3072 <= one_launch_work[0] < 1024 * 3072 * 3072


class RecordingRowQuantizer:
    """Stands in for ``quant_triton.RowQuantizer``: records whether it was asked for shared outputs."""

    scratch: list[bool] = []  # noqa: RUF012

    def __init__(self, *args, scratch: bool = False, **kwargs) -> None:
        RecordingRowQuantizer.scratch.append(scratch)

    def __call__(self, x2d, buffers=(None, None, None, None)):
        return "codes", "scales"


def test_only_a_caller_that_asks_gets_the_shared_outputs(monkeypatch):
    """``scratch`` reaches the row quantizer from the binding (the prepared ``_scaled_mm`` product asks for it), and
    a plain binding keeps its own allocations: the shared buffers are overwritten by the next call on the stream."""
    from fp8_quant import quant_triton

    monkeypatch.setattr(quant_triton, "RowQuantizer", RecordingRowQuantizer)
    RecordingRowQuantizer.scratch.clear()
    triton_quantizer(False).bind(torch.bfloat16, 64, CUDA, row_scales=True)
    triton_quantizer(False).bind(torch.bfloat16, 64, CUDA, row_scales=True, scratch=True)
    triton_quantizer(True, PER_TENSOR).bind_running(torch.float16, 48, CUDA, 1.25, True, None, True)
    triton_quantizer(True, PER_TENSOR).bind_running(torch.float16, 48, CUDA, 1.25, True)
    assert RecordingRowQuantizer.scratch == [False, True, True, False]


def test_shared_outputs_are_kept_per_device_stream_and_shape(monkeypatch):
    from types import SimpleNamespace

    from fp8_quant import quant_triton

    monkeypatch.setattr(quant_triton, "_scratch", {})
    quantizer = SimpleNamespace(device_index=0, device=torch.device("cpu"), cols=64, dtype=torch.float8_e4m3fn,
                                row_scales=True)  # fmt: skip
    codes, scales = quant_triton._scratch_outputs(quantizer, 5, stream=11)
    assert codes.shape == (5, 64) and codes.dtype == torch.float8_e4m3fn and scales.shape == (5, 1)
    again = quant_triton._scratch_outputs(quantizer, 5, stream=11)
    assert again[0] is codes and again[1] is scales
    assert quant_triton._scratch_outputs(quantizer, 5, stream=12)[0] is not codes  # another stream: its own
    assert quant_triton._scratch_outputs(quantizer, 6, stream=11)[0] is not codes
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:  # another thread on the same stream: its own
        assert pool.submit(quant_triton._scratch_outputs, quantizer, 5, 11).result()[0] is not codes
    no_scales = SimpleNamespace(**{**vars(quantizer), "row_scales": False})
    assert quant_triton._scratch_outputs(no_scales, 5, stream=11)[1] is None
    monkeypatch.setattr(quant_triton, "SCRATCH_TOTAL_BYTES", 8 * 65 * 10)  # bytes: codes plus 4 per row scale
    for rows in range(7, 15):  # 8 more shapes: past the total, the table starts again
        quant_triton._scratch_outputs(quantizer, rows, stream=11)
    held = sum(codes.numel() + 4 * codes.shape[0] for codes, _ in quant_triton._scratch.values())
    assert held <= quant_triton.SCRATCH_TOTAL_BYTES and (5, 11) not in {(k[3], k[1]) for k in quant_triton._scratch}
    assert quant_triton._scratch_outputs(quantizer, 5, stream=11)[0] is not codes


def test_shared_outputs_only_for_calls_of_few_rows():
    from fp8_quant import quant_triton

    made = quant_triton.RowQuantizer(quant_triton.STATIC, torch.bfloat16, torch.float8_e4m3fn, 5120, CUDA,
                                     row_scales=True, scratch=True)  # fmt: skip
    assert made.scratch_rows * 5120 <= quant_triton.SCRATCH_BYTES < (made.scratch_rows + 1) * 5120
    assert made.scratch_rows >= 256  # the few-row calls whose allocations cost the host most (bench/NOTES.md)
    plain = quant_triton.RowQuantizer(quant_triton.STATIC, torch.bfloat16, torch.float8_e4m3fn, 5120, CUDA)
    assert plain.scratch_rows == 0


def test_a_paths_check_is_made_once_per_device_never_in_a_capture_and_fails_closed(monkeypatch):
    """``quant_triton.checked_once_per_device`` (the one-launch linear's and the Triton GEMM's check): one call of
    the check per device, its answer kept; none while a capture runs (and nothing kept); an error is a failure."""
    from fp8_quant import quant_triton

    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: f"GPU {index}")
    calls: list[int] = []

    def passes(device):
        calls.append(device.index)
        return True

    def raises(device):
        calls.append(device.index)
        raise RuntimeError("no fp8 dot here")

    results: dict[int, bool] = {}
    capturing[0] = True
    assert not quant_triton.checked_once_per_device(results, torch.device("cuda", 0), passes, "a path")
    assert not calls and not results
    capturing[0] = False
    for _ in range(2):
        assert quant_triton.checked_once_per_device(results, torch.device("cuda", 0), passes, "a path")
        assert not quant_triton.checked_once_per_device(results, torch.device("cuda", 1), raises, "a path")
    assert calls == [0, 1] and results == {0: True, 1: False}
