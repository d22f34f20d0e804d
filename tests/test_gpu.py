"""GPU tests: the fused quantizer and the ``_scaled_mm`` kernels on CUDA (skipped without FP8 compute)."""

import pytest
import torch
from helpers import outlier_input, random_linear, rel_err

from fp8_quant import Fp8Config, Fp8OnlineLinearMethod, QuantFP8, prepare_model_for_fp8, supports_fp8_compute
from fp8_quant.fp8_utils import quantize_input_dynamic, quantize_input_static
from fp8_quant.kernels import ChannelWiseScaledMMKernel, DequantLinearKernel, PerTensorScaledMMKernel
from fp8_quant.scheme import PER_TENSOR, PER_TOKEN

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not supports_fp8_compute(), reason="needs a CUDA GPU with FP8 compute (capability 8.9+)"),
]


@pytest.mark.parametrize("k", [64, 3072, 5120, 20000])
@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_quant_matches_eager(k, per_token, dtype):
    x = outlier_input(3, 37, k, seed=41, dtype=dtype).cuda()
    x[0, 3] = 0  # an all-zero row
    q_fast, s_fast = QuantFP8(False, PER_TOKEN if per_token else PER_TENSOR)(x)
    q_ref, s_ref = quantize_input_dynamic(x, per_token=per_token)
    assert s_fast.shape == s_ref.shape
    torch.testing.assert_close(s_fast, s_ref, rtol=1e-6, atol=0)
    mismatch = (q_fast.float() != q_ref.float()).float().mean().item()
    assert mismatch < 1e-3  # division vs reciprocal may round a rare tie differently
    static = QuantFP8(True, PER_TENSOR)(x, torch.tensor(0.05, device="cuda"))[0]
    assert (static.float() != quantize_input_static(x, torch.tensor(0.05, device="cuda")).float()).float().mean() < 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_direct_quantizer_launches_match_tritons_own(dtype):
    """After a shape's first launch the quantizer launches the compiled kernel directly (Triton's launch path costs a
    host-bound layer more than the kernel); every mode must give what Triton's own launch gives, also for an input
    whose rows start off the 16-byte alignment the first launch was compiled for (a view into a wider tensor)."""
    from fp8_quant import quant_triton

    assert quant_triton.direct_launch_works()  # this Triton takes the direct launch: the path below is exercised
    wide = outlier_input(4096 + 1, 3072 + 8, seed=5, dtype=dtype).cuda()
    inputs = {"aligned": wide[:4096, :3072].contiguous(), "offset": wide[1:, 3:3075]}
    assert inputs["offset"].data_ptr() % 16 != 0
    for name, x in inputs.items():
        history = torch.tensor([3.0], device="cuda")

        def all_modes(x=x, history=history):
            spare, scale, overshoot = (torch.zeros(1, device="cuda") for _ in range(3))
            q_dyn, s_dyn = quant_triton._launch(x, torch.float8_e4m3fn, quant_triton.DYNAMIC)
            q_static = quant_triton.quantize_static_triton(x, torch.tensor(0.02, device="cuda"), torch.float8_e4m3fn)
            q_run = quant_triton.quantize_running_triton(
                x, torch.float8_e4m3fn, history, spare, scale, overshoot, 2.0
            )
            return [q_dyn.view(torch.uint8), s_dyn, q_static.view(torch.uint8), q_run.view(torch.uint8), spare, scale]

        quant_triton._direct_launches.clear()
        through_triton = all_modes()  # compiles and remembers each launch...
        keys = len(quant_triton._direct_launches)
        direct = all_modes()  # ...and launches it directly the second time
        assert len(quant_triton._direct_launches) == keys >= 3, name
        for got, expected in zip(direct, through_triton):
            assert torch.equal(got, expected), name


@pytest.mark.parametrize(
    "config, kernel",
    [
        (Fp8Config(), ChannelWiseScaledMMKernel),
        (Fp8Config(weight_granularity="tensor", activation_granularity="tensor"), PerTensorScaledMMKernel),
        (Fp8Config(activation_scheme="none"), DequantLinearKernel),
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_automatic_kernels_on_cuda(config, kernel, dtype):
    reference = random_linear(1024, 768, seed=42)
    layer = random_linear(1024, 768, seed=42).to(dtype)
    method = Fp8OnlineLinearMethod(config)
    method.process_weights_after_loading(layer, "layer", quantize_device="cuda")
    layer.cuda()
    x = outlier_input(4, 77, 1024, seed=43) / 64  # keeps the float16 reference inside its range
    out = method.apply(layer, x.to("cuda", dtype), layer.bias)
    assert type(method.kernel_for(layer, x.cuda().device)) is kernel
    assert out.dtype == dtype
    bound = 0.05 if config.quantizes_activations else 0.03
    assert rel_err(out.cpu(), reference(x)) < bound


def test_offloaded_weights_stream_to_the_input_device():
    model = torch.nn.Sequential(random_linear(256, 512, seed=44), torch.nn.GELU(), random_linear(512, 256, seed=45))
    x = outlier_input(8, 256, seed=46)
    reference = model(x)
    prepare_model_for_fp8(model, Fp8Config(), quantize_device="cuda")
    assert model[0].weight.device.type == "cpu"
    assert rel_err(model(x.cuda()).cpu(), reference) < 0.06


def test_comfy_protocol_layer_on_cuda_streams_and_patches(tmp_path):
    """The ComfyUI-protocol fp8 Linear on the GPU: weights offloaded on the CPU, then loaded, then LoRA-patched."""
    from checkpoints import source_weights
    from test_nodes_ops import fp8_model, lora_delta, reference_model

    source = {k: v / 4 for k, v in source_weights().items()}
    source["blocks.0.norm.bias"] = torch.zeros(32)
    source["head.bias"] = torch.zeros(16)
    model, _ = fp8_model(tmp_path, source, "weight-scale", per_channel=True)
    reference = reference_model(source)
    x = outlier_input(2, 5, 32, seed=61)
    expected = reference(x)
    on_cpu = model(x)
    model.blocks[0].norm.cuda()
    model.head.cuda()
    streamed = model(x.cuda())  # fp8 layers still on the CPU: streamed per call
    # The CPU multiplies in high precision (activations unrounded), the GPU in fp8: they differ by that rounding.
    assert rel_err(streamed.cpu(), on_cpu) < 0.06
    assert rel_err(streamed.cpu(), expected) < 0.1
    model.cuda()
    assert rel_err(model(x.cuda()).cpu(), streamed.cpu()) < 1e-2
    layer = model.blocks[0].ffn[0]
    layer.set_weight(layer.convert_weight(layer.weight.float()) + lora_delta(layer, 1).cuda())
    assert model(x.cuda()).isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rowwise_outputs_the_model_dtype_where_torch_allows(dtype):
    from fp8_quant.kernels.scaled_mm import rowwise_output_dtypes

    reference = random_linear(1024, 768, seed=47)
    layer = random_linear(1024, 768, seed=47).to(dtype)
    method = Fp8OnlineLinearMethod(Fp8Config())
    method.process_weights_after_loading(layer, "layer", quantize_device="cuda")
    layer.cuda()
    x = outlier_input(64, 1024, seed=48) / 64
    out = method.apply(layer, x.to("cuda", dtype), layer.bias)
    assert out.dtype == dtype and rel_err(out.cpu(), reference(x)) < 0.05
    print("row-wise _scaled_mm output dtypes:", rowwise_output_dtypes("cuda", torch.cuda.current_device()))


def test_running_triton_quant_follows_the_amax_in_one_pass():
    x = outlier_input(300, 5120, seed=49, dtype=torch.bfloat16).cuda()
    history, spare = torch.tensor([10.0], device="cuda"), torch.zeros(1, device="cuda")
    scale_out, overshoot = torch.zeros(1, device="cuda"), torch.zeros(1, device="cuda")
    q, scale, now = QuantFP8(True, PER_TENSOR).running(x, history, spare, scale_out, overshoot, margin=2.0)
    amax = x.float().abs().max()
    assert now is spare and now.item() == max(10.0, amax.item())
    assert scale.item() == pytest.approx(10.0 * 2 / 448, rel=1e-6)
    assert overshoot.item() == pytest.approx((amax / (scale * 448)).item(), rel=1e-5)
    reference = quantize_input_static(x, scale)
    assert (q.float() != reference.float()).float().mean() < 1e-3


def test_calibrated_model_on_cuda_learns_without_host_sync_and_compiles():
    """A small MLP quantized with the defaults (auto weights, calibrated activations): after a few calls its layers
    run static per-tensor scales on the per-tensor kernel; then torch.compile (inductor) of the whole model runs
    in one graph with the same numbers."""
    from fp8_quant.auto_scales import STATIC

    torch.manual_seed(50)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 1024)).cuda()
    model = model.to(torch.float16)
    x = torch.randn(4, 256, 1024, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        reference = model.float()(x.float())
        model.half()
        prepare_model_for_fp8(model, Fp8Config(activation_scheme="calibrated", weight_granularity="auto"))
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()  # the calibration copies are done: the next calls decide
        for _ in range(2):
            out = model(x)
        for layer in (model[0], model[2]):
            assert layer.fp8.activation.phase == STATIC
            assert type(layer.fp8.method.kernel_for(layer, x.device)) is PerTensorScaledMMKernel
        assert rel_err(out.float(), reference) < 0.08  # two fp8 layers in fp16; a lost scale would be far off
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(x).float(), out.float(), rtol=0.02, atol=0.02)


def test_nan_weight_is_refused_when_quantized_on_the_gpu():
    layer = random_linear(256, 128, seed=51)
    with torch.no_grad():
        layer.weight[7, 3] = float("nan")
    with pytest.raises(ValueError, match="lin: weight holds NaN"):
        Fp8OnlineLinearMethod(Fp8Config()).process_weights_after_loading(layer, "lin", quantize_device="cuda")


@pytest.mark.parametrize(
    "config, kernel",
    [
        (Fp8Config(), ChannelWiseScaledMMKernel),
        (Fp8Config(weight_granularity="tensor", activation_granularity="tensor"), PerTensorScaledMMKernel),
    ],
)
def test_fast_accumulation_by_rule_or_timed_keeps_the_layer_error(config, kernel, monkeypatch):
    from fp8_quant.kernels import fast_accum

    fast_accum.forget()
    timings = []
    time_both = fast_accum.time_both
    monkeypatch.setattr(fast_accum, "time_both", lambda *args: timings.append(args[1]) or time_both(*args))
    reference = random_linear(8192, 4096, seed=47)  # 4096 x 8192 x 4096: 275 GFLOP, timed under auto
    x = outlier_input(4096, 8192, seed=48) / 8
    expected = reference(x).double()
    errors, outputs = {}, {}
    for setting in ("off", "on", "rowwise", "auto"):
        monkeypatch.setenv(fast_accum.FAST_ACCUM_ENV, setting)
        layer = random_linear(8192, 4096, seed=47).half()
        method = Fp8OnlineLinearMethod(config)
        method.process_weights_after_loading(layer, "layer", quantize_device="cuda")
        layer.cuda()
        xs = x.to("cuda", torch.float16)
        outputs[setting] = method.apply(layer, xs, layer.bias)
        assert type(method.kernel_for(layer, xs.device)) is kernel
        assert torch.equal(method.apply(layer, xs, layer.bias), outputs[setting])  # same choice, same output
        errors[setting] = rel_err(outputs[setting].double().cpu(), expected)
    assert not torch.equal(outputs["on"], outputs["off"])  # the flag reaches the GEMM
    assert torch.equal(outputs["rowwise"], outputs["on" if kernel.fast_accum_by_rule else "off"])
    assert len(timings) == 1  # auto timed the problem once; the other settings never
    (key, fast), *others = fast_accum.decisions().items()
    assert not others and key[:6] == (kernel.name, 4096, 8192, 4096, torch.float16, True)
    assert torch.equal(outputs["auto"], outputs["on" if fast else "off"])
    assert errors["off"] < 0.05
    assert abs(errors["on"] - errors["off"]) < 0.01 * errors["off"], errors  # lost in the fp8 rounding
    fast_accum.forget()
