"""tools/render_bench_table.py: the benchmarks page (docs/benchmarks.md) comes from bench/results/*.json."""

from __future__ import annotations

import json

import pytest

from tools import render_bench_table as bench_table

STEP = {
    "preset": "wan14b-4layers",
    "latent": [1, 16, 9, 60, 104],
    "gpu": "H100 80GB HBM3",
    "results": {
        "stock default dtype": {"ms": 112.4, "weights_gib": 3.06, "rel_err_vs_fp32": 0.0005},
        "stock on our comfy-quant file": {"ms": 93.0, "weights_gib": 1.63, "rel_err_vs_fp32": 0.0032},
        "ours auto (bf16 file)": {"ms": 93.6, "weights_gib": 1.62, "rel_err_vs_fp32": 0.0033},
        "stock on our comfy-quant file +compile": {"error": "AssertionError: vr must not be None"},
    },
}
LOAD = {
    "preset": "wan14b-4layers",
    "cycles": 8,
    "summary": {
        "stock_bf16_load_s_median": 0.8,
        "ours_load_s_median": 0.9,
        "load_ratio": 1.125,
        "max_allocated_drift_mib": 33.0,
        "growth_after_first_round_mib": 2.0,
        "max_staged_peak_over_bound": 0.56,
    },
    "runs": [],
}
LINEAR = [
    {"shape": "Flux qkv", "mkn": [4608, 3072, 9216], "method": m, "ms": ms, "tflops": 1000.0, "rel_err": 0.03}
    for m, ms in (("bf16 F.linear", 0.360), ("ComfyUI fp8_e4m3fn_fast", 0.263), ("ours dynamic per-token", 0.233))
]


def test_tables_from_every_kind_of_result_model_steps_first(tmp_path):
    (tmp_path / "a_linear.json").write_text(json.dumps(LINEAR))
    (tmp_path / "b_step.json").write_text(json.dumps(STEP))
    (tmp_path / "c_load.json").write_text(json.dumps(LOAD))
    text = bench_table.render(tmp_path)
    assert text.index("wan14b-4layers") < text.index("Flux qkv") < text.index("Loading")
    assert "| ours auto (bf16 file) | 93.6 | 1.20 | 0.99 | 0.0033 | 1.62 |" in text
    assert "| stock on our comfy-quant file +compile | failed: AssertionError: vr must not be None | | | | |" in text
    assert "| Flux qkv 4608×3072×9216 | ours dynamic per-token | 0.233 | 1000 | 1.55 | 1.13 | 0.0300 |" in text
    assert "From `bench/results/b_step.json` (gpu H100 80GB HBM3)." in text
    assert "| 0.80 | 0.90 | 1.12 | 2 | 0.56 |" in text


def test_step_table_shows_each_pass_and_the_host_cost_per_linear(tmp_path):
    """Few-token presets are timed in several passes (the host's speed drifts) and probe one linear's host cost."""
    step = {
        **STEP,
        "preset": "flux-2d4s-512px",
        "passes": 3,
        "dynamic_vram": True,
        "results": {
            "stock default dtype": {
                "ms": 14.3,
                "ms_passes": [14.4, 12.5, 14.3],
                "weights_gib": 2.44,
                "rel_err_vs_fp32": 0.21,
                "linear_ms": {"rows=1": 0.035, "rows=256": 0.035},
            },
            "stock on our comfy-quant file": {
                "ms": 30.8,
                "ms_passes": [30.8, 22.2, 32.6],
                "weights_gib": 1.40,
                "rel_err_vs_fp32": 0.2125,
                "linear_ms": {"rows=1": 0.445, "rows=256": 0.418},
            },
            "ours auto (bf16 file)": {"error": "RuntimeError: boom"},
        },
    }
    (tmp_path / "step.json").write_text(json.dumps(step))
    text = bench_table.render(tmp_path)
    assert "**flux-2d4s-512px**, ComfyUI's dynamic VRAM on," in text
    assert "| path | ms (median of 3 passes; each pass) |" in text and " µs/linear |" in text
    assert "| stock on our comfy-quant file | 30.8 (30.8 / 22.2 / 32.6) | 0.46 | 1.00 | 0.2125 | 1.40 | 418 |" in text
    assert "| ours auto (bf16 file) | failed: RuntimeError: boom | | | | | |" in text


def gemm_row(fused: dict | None) -> dict:
    row = {
        "shape": "Wan14B ffn down",
        "mkn": [14040, 13824, 5120],
        "dtype": "float16",
        "cublas": {"ms": 1.634, "accum_err": 2.8e-4, "err": 0.0375},
        "cublas_fast_accum": {"ms": 1.546, "accum_err": 3.1e-3, "err": 0.0376},
        "rowwise": {"ms": 2.140},
        "rowwise_fast_accum": {"ms": 1.609},
        "quant_pass_ms": 0.199,
        "today: quant + cublas": {"ms": 1.819},
    }
    if fused is not None:
        row["triton_fused_quant_gemm"] = fused
    return row


def test_gemm_variants_table_shows_both_accumulations_and_the_fused_gemm_only_if_timed(tmp_path):
    path = tmp_path / "gemm.json"
    path.write_text(json.dumps({"kind": "gemm-variants", "rows": [gemm_row(None)]}))
    _, text = bench_table.render_file(path)
    assert (
        "| Wan14B ffn down 14040×13824×5120 | float16 | 1.634 | 1.546 | 1.06 | 2.8e-04 / 3.1e-03 | 0.0375 / 0.0376 "
        "| 2.140 | 1.609 | 1.33 | 0.199 | 1.819 |" in text
    )
    assert "Triton" not in text
    path.write_text(json.dumps({"kind": "gemm-variants", "rows": [gemm_row({"ms": 2.725}), gemm_row({"error": "x"})]}))
    _, text = bench_table.render_file(path)
    assert "| 1.819 | 2.725 |" in text and "| 1.819 | x |" in text


def test_placeholder_without_results(tmp_path):
    assert bench_table.render(tmp_path / "none") == bench_table.PLACEHOLDER


def test_unknown_result_names_the_file(tmp_path):
    (tmp_path / "odd.json").write_text(json.dumps({"something": 1}))
    with pytest.raises(bench_table.ResultError, match="odd.json"):
        bench_table.render(tmp_path)


def test_section_replaced_between_markers_only():
    readme = f"intro\n{bench_table.START}\nold\n{bench_table.END}\nrest\n"
    once = bench_table.replace_section(readme, "new")
    assert once == f"intro\n{bench_table.START}\nnew\n{bench_table.END}\nrest\n"
    assert bench_table.replace_section(once, "new") == once
    with pytest.raises(bench_table.ResultError):
        bench_table.replace_section("no markers", "new")


def test_gpu_test_run_summary_is_shown_after_the_measurements(tmp_path):
    """tools/run_gpu_tests.sh keeps its summary in bench/results/: one row, and the failed tests by name."""
    (tmp_path / "a_step.json").write_text(json.dumps(STEP))
    (tmp_path / "gpu-tests-h200.json").write_text(
        json.dumps(
            {
                "kind": "gpu-tests",
                "gpu": "NVIDIA H200",
                "torch": "2.11.0",
                "triton": "3.6.0",
                "commit": "abc1234",
                "date": "2026-12-03",
                "counts": {"passed": 40, "failed": 1, "skipped": 2},
                "failed": ["tests/test_gpu.py::test_x"],
            }
        )
    )
    text = bench_table.render(tmp_path)
    assert text.index("wan14b-4layers") < text.index("GPU test suite")
    assert "| NVIDIA H200 | 2.11.0 | 3.6.0 | abc1234 | 40 | 1 | 2 |" in text
    assert "Failed: `tests/test_gpu.py::test_x`" in text


def test_benchmarks_page_is_up_to_date_and_linked_from_the_readme():
    assert bench_table.main(["--check"]) == 0, "run python tools/render_bench_table.py"
    readme = (bench_table.ROOT / "README.md").read_text()
    assert "(docs/benchmarks.md)" in readme and bench_table.START not in readme
