from fp8_quant.__main__ import main
from fp8_quant.demo import run_demo


def test_demo_cli_prints_error_and_bytes(capsys):
    assert main(["demo", "--width", "64", "--depth", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    error = float(out.split("relative error vs fp32 ")[1].split(";")[0])
    assert 0 < error < 0.08
    assert "linears quantized" in out and "MiB ->" in out


def test_demo_figures():
    result = run_demo(width=64, depth=2, tokens=32, device="cpu")
    assert result["bytes_after"] < 0.3 * result["bytes_before"]
