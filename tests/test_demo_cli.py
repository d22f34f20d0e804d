from fp8_quant.__main__ import main
from fp8_quant.demo import run_demo


def test_demo_cli_prints_error_and_bytes(capsys):
    assert main(["demo", "--width", "64", "--depth", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    error = float(out.split("relative error vs fp32 ")[1].split(";")[0])
    assert 0 < error < 0.08
    assert "linears quantized" in out


def test_demo_compares_bytes_with_bf16(capsys):
    """The pitch is half of bf16: the reference is the bf16 size of the linear weights (one block of width 512:
    512x2048 twice, 2 bytes each = 4.0 MiB), not the fp32 the random model is built in (8.0 MiB)."""
    assert main(["demo", "--width", "512", "--depth", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "vs 4.0 MiB in bf16 (0.50x)" in out.splitlines()[-1], out


def test_demo_figures():
    result = run_demo(width=64, depth=2, tokens=32, device="cpu")
    assert result["bytes_after"] < 0.3 * result["bytes_before"]
