"""Render the benchmarks page (docs/benchmarks.md) from the benchmark results in bench/results/*.json.

Run: python tools/render_bench_table.py [--check]. docs/benchmarks.md holds the rendered tables between the markers
``<!-- bench:start -->`` and ``<!-- bench:end -->``; this script rewrites that part (``--check``: only say whether
it is up to date, exit status 1 if not; ``tests/test_bench_table.py`` runs it), so the numbers users read are
always the ones a benchmark wrote. The README links the page and keeps a short summary.

Result files (what ``--json PATH`` of the benchmark scripts writes; the optional keys ``gpu``, ``torch``,
``comfyui``, ``comfy-kitchen`` and ``date`` at the top level are shown with the table):

- ``bench/bench_comfy_dit.py``: ``{"preset": ..., "latent": [...], "results": {path: {"ms", "weights_gib",
  "rel_err_vs_fp32"} or {"error"}}}``, one ``apply_model`` call of a DiT inside ComfyUI;
- ``bench/bench_gemm_variants.py``: ``{"kind": "gemm-variants", "rows": [...]}``, fast vs exact fp8 accumulation
  and a Triton GEMM that quantizes its A operand, per DiT shape;
- ``bench/bench_lowbit_attention.py``: ``{"shapes": {name: {"shape", "paths": {path: {"ms", "tflops",
  "rel_err"}}, "x_cudnn"}}}``, attention alone, torch's SDPA backends beside the pack's 8-bit kernel;
- ``bench/bench_int8_gemm.py``: ``{"kind": "int8-gemm", "rows": [{"shape", "mkn", "ms": {path: ms}}]}``, the
  pieces of a rotated int8 linear per DiT shape;
- ``bench/bench_one_launch_tiles.py``: ``{"kind": "one-launch-tiles", "results": [{"width", "rows", "bf16_us",
  "two_launches_us", "one_launch_us": {tile: us}}]}``, the one-launch linear's GPU time per tile.
- ``bench/bench_one_launch_variants.py``: ``{"kind": "one-launch-variants", "results": [{"width", "rows",
  "bf16_us", "two_launches_us", "quantizer_us", "variants": {name: {"us", ...}}, "wall_us": {path: us}}]}``, GPU
  time of the one launch's variants and of a Triton GEMM on codes, and wall time per call of the fastest;
- ``bench/bench_cpu_formats.py``: ``{"kind": "cpu-formats", "rows": [{"shape", "paths": {path: {"ms",
  "x_float32", "rel_err"}}}]}``, one linear's 8-bit forms on a CPU beside ComfyUI's fp8 weight cast;
- ``bench/lowbit_attention_accumulation.py``: ``{"kind": "attention-accumulation-model", "rows": [{"inputs",
  "keys", "accumulation", "rel_err"}]}``, a CPU model of the 8-bit attention's fp8 accumulation;
- ``tools/run_gpu_tests.sh``: ``{"kind": "gpu-tests", "counts": {"passed", "failed", "skipped"}, "failed": [...]}``,
  the last run of the GPU test suite on a GPU;
- ``bench/bench_linear.py``: a list of ``{"shape", "mkn", "method", "ms", "tflops", "rel_err"}`` rows (or
  ``{"rows": [...], ...}``), one linear layer.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
STEP_STOCK, STEP_QUANT = "stock default dtype", "stock on our comfy-quant file"
LINEAR_BF16, LINEAR_FAST = "bf16 F.linear", "ComfyUI fp8_e4m3fn_fast"
CONTEXT_KEYS = ("gpu", "device", "torch", "comfyui", "comfy-kitchen", "date")
PLACEHOLDER = (
    "No measurements in `bench/results/` yet. On a GPU, `COMFYUI_DIR=... python bench/bench_comfy_dit.py --json "
    "bench/results/wan14b.json` (a Wan step inside ComfyUI) and `python bench/bench_linear.py --json "
    "bench/results/linear.json` (single layers) write them; `python tools/render_bench_table.py` then fills "
    "this section. Earlier measurements, with how they were taken: `bench/NOTES.md`."
)


class ResultError(ValueError):
    """A result file this script cannot read; the message names the file."""


def ratio(baseline: float | None, ms: float) -> str:
    return f"{baseline / ms:.2f}" if baseline else "—"


def context_line(path: Path, data: dict) -> str:
    known = [f"{key} {data[key]}" for key in CONTEXT_KEYS if data.get(key)]
    line = f"From `bench/results/{path.name}`" + (f" ({', '.join(known)})." if known else ".")
    return f"{line} {data['notes']}" if data.get("notes") else line


def step_table(path: Path, data: dict) -> str:
    results = data["results"]
    stock = results.get(STEP_STOCK, {}).get("ms")
    quant = results.get(STEP_QUANT, {}).get("ms")
    latent = "×".join(str(size) for size in data.get("latent", [])) or "?"
    passes = int(data.get("passes", 1))
    probe = any("linear_ms" in row for row in results.values())
    setting = ", ComfyUI's dynamic VRAM on" if data.get("dynamic_vram") else ""
    if data.get("outliers"):
        setting += (
            ", a model with trained DiTs' outlier traits (channel spread, outlier input columns, massive residual "
            "channels)"
        )
    time_title = f"ms (median of {passes} passes; each pass)" if passes > 1 else "ms"
    lines = [
        f"**{data['preset']}**{setting}, one `apply_model` call inside ComfyUI, latent {latent}, error vs the same "
        "model in float32 (× = the other's time / this one's"
        + ("; µs/linear: one of its linears called alone on 256 rows, what the host pays per linear" if probe else "")
        + "):",
        "",
        f"| path | {time_title} | × stock | × stock comfy-quant | rel. error vs fp32 | weights GiB |"
        + (" µs/linear |" if probe else ""),
        "|---|---|---|---|---|---|" + ("---|" if probe else ""),
    ]
    for name, row in results.items():
        if "ms" not in row:
            lines.append(f"| {name} | failed: {row.get('error', '?')} | | | | |" + (" |" if probe else ""))
            continue
        each = " / ".join(f"{ms:.1f}" for ms in row.get("ms_passes", []))
        time_cell = f"{row['ms']:.1f} ({each})" if passes > 1 and each else f"{row['ms']:.1f}"
        line = (
            f"| {name} | {time_cell} | {ratio(stock, row['ms'])} | {ratio(quant, row['ms'])} "
            f"| {row['rel_err_vs_fp32']:.4f} | {row['weights_gib']:.2f} |"
        )
        if probe:
            host = row.get("linear_ms", {}).get("rows=256")
            line += f" {host * 1000:.0f} |" if host is not None else " — |"
        lines.append(line)
    return "\n".join([*lines, "", context_line(path, data)])


def linear_table(path: Path, data: dict) -> str:
    rows = data["rows"]
    lines = [
        "One linear layer (ms per call; × = the other's time / this one's):",
        "",
        "| shape (M×K×N) | method | ms | TFLOP/s | × bf16 | × ComfyUI fp8 fast | rel. error vs fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    by_shape: dict[str, list[dict]] = {}
    for row in rows:
        by_shape.setdefault(row["shape"], []).append(row)
    for shape, shape_rows in by_shape.items():
        times = {row["method"]: row["ms"] for row in shape_rows}
        m, k, n = shape_rows[0]["mkn"]
        for row in shape_rows:
            lines.append(
                f"| {shape} {m}×{k}×{n} | {row['method']} | {row['ms']:.3f} | {row['tflops']:.0f} "
                f"| {ratio(times.get(LINEAR_BF16), row['ms'])} | {ratio(times.get(LINEAR_FAST), row['ms'])} "
                f"| {row['rel_err']:.4f} |"
            )
    return "\n".join([*lines, "", context_line(path, data)])


def gemm_variants_table(path: Path, data: dict) -> str:
    rows = data["rows"]
    fused = any("ms" in row.get("triton_fused_quant_gemm", {}) for row in rows)
    lines = [
        "**fp8 GEMM variants** per DiT shape (ms per call; × = exact accumulation's time / fast accumulation's; "
        "accumulation error vs an fp64 product of the same fp8 operands, layer error vs the unrounded operands' "
        'product; "today" is the one-pass quantizer then per-tensor `_scaled_mm`):',
        "",
        "| shape (M×K×N) | dtype | per-tensor exact ms | fast ms | × | accum. error exact / fast | layer error exact / "
        "fast | row-wise exact ms | fast ms | × | quant pass ms | today ms |"
        + (" Triton fused-quant GEMM ms |" if fused else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if fused else ""),
    ]
    for row in rows:
        m, k, n = row["mkn"]
        exact, fast = row["cublas"], row["cublas_fast_accum"]
        rowwise, rowwise_fast = row.get("rowwise", {}), row.get("rowwise_fast_accum", {})
        rowwise_cells = (
            f"{rowwise['ms']:.3f} | {rowwise_fast['ms']:.3f} | {ratio(rowwise['ms'], rowwise_fast['ms'])}"
            if "ms" in rowwise and "ms" in rowwise_fast
            else "— | — | —"
        )
        line = (
            f"| {row['shape']} {m}×{k}×{n} | {row['dtype']} | {exact['ms']:.3f} | {fast['ms']:.3f} "
            f"| {ratio(exact['ms'], fast['ms'])} | {exact['accum_err']:.1e} / {fast['accum_err']:.1e} "
            f"| {exact['err']:.4f} / {fast['err']:.4f} | {rowwise_cells} | {row['quant_pass_ms']:.3f} "
            f"| {row['today: quant + cublas']['ms']:.3f} |"
        )
        if fused:
            cell = row.get("triton_fused_quant_gemm", {})
            line += f" {cell['ms']:.3f} |" if "ms" in cell else f" {cell.get('error', '—')} |"
        lines.append(line)
    return "\n".join([*lines, "", context_line(path, data)])


def load_table(path: Path, data: dict) -> str:
    summary = data["summary"]
    return "\n".join(
        [
            f"**Loading** ({data['preset']}, {data['cycles']} load/unload cycles through Load FP8 DiT, options "
            "alternating, full and lowvram loads):",
            "",
            "| stock bf16 load s | ours, quantizing on the fly, s | ratio | GPU memory growth over the cycles, MiB "
            "| staged peak / (1.05 × fp8 model + one bf16 layer) |",
            "|---|---|---|---|---|",
            f"| {summary['stock_bf16_load_s_median']:.2f} | {summary['ours_load_s_median']:.2f} "
            f"| {summary['load_ratio']:.2f} | {summary['growth_after_first_round_mib']:.0f} "
            f"| {summary['max_staged_peak_over_bound']:.2f} |",
            "",
            context_line(path, data),
        ]
    )


def keyed_table(intro: str, columns: list[tuple[str, str, str]], rows: dict[str, dict], path: Path, data: dict) -> str:
    """A table of named rows: ``columns`` are (title, key in each row, format spec)."""
    lines = [intro, "", "| " + " | ".join(title for title, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for name, row in rows.items():
        cells = [name, *(format(row[key], spec) for _, key, spec in columns[1:])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", context_line(path, data)])


def text_encoder_quality_table(path: Path, data: dict) -> str:
    intro = f"**Text encoder, real weights** ({data['model']}; sentence-embedding cosine vs float32):"
    columns = [("recipe", "", ""), ("mean cosine", "mean_cosine", ".5f"), ("min cosine", "min_cosine", ".5f")]
    if all("mean_cosine_prompts" in row for row in data["runs"].values()):
        intro = (
            f"**Text encoder, real weights** ({data['model']}; sentence-embedding cosine vs float32 on 64 held-out "
            "sentences and on 32 held-out prompts):"
        )
        columns += [("prompts: mean", "mean_cosine_prompts", ".5f"), ("prompts: min", "min_cosine_prompts", ".5f")]
    columns.append(("linear bytes / bf16", "bytes_vs_bf16", ".3f"))
    return keyed_table(intro, columns, data["runs"], path, data)


def text_encoder_speed_table(path: Path, data: dict) -> str:
    intro = f"**Text encoder inside ComfyUI** (a random T5-XXL, {data.get('words', '?')} words; error vs bf16):"
    columns = [
        ("path", "", ""),
        ("ms/encode", "ms/encode", ".1f"),
        ("time / bf16", "time/bf16", ".2f"),
        ("× ComfyUI fp8 file", "x ComfyUI fp8", ".2f"),
        ("weights GiB", "weights GiB", ".2f"),
        ("rel. error", "rel err", ".4f"),
    ]
    return keyed_table(intro, columns, data["paths"], path, data)


def prepare_table(path: Path, data: dict) -> str:
    """``bench/te_prepare_time.py``: Quantize Text Encoder's preparation time, a cold fit and a stored one."""
    lines = [
        f"**Quantize Text Encoder, preparation** ({data['encoder']}, random weights of the real size, "
        f"{data['device']}):",
        "",
        "| run | seconds | phases (s) |",
        "|---|---|---|",
    ]
    for name, run in data["runs"].items():
        phases = "; ".join(f"{phase} {seconds:.1f}" for phase, seconds in run.get("phases", {}).items()) or "—"
        lines.append(f"| {name} | {run['seconds']:.1f} | {phases} |")
    return "\n".join([*lines, "", context_line(path, data)])


def attention_table(path: Path, data: dict) -> str:
    """Attention alone per shape: each path's ms, TFLOP/s, speed against cuDNN and error vs fp32."""
    lines = [
        f"**Attention alone**, ms (× cuDNN, >1: faster), relative error vs fp32. {context_line(path, data)}",
        "",
    ]
    shapes = {name: entry for name, entry in data["shapes"].items() if "paths" in entry}
    paths = list(dict.fromkeys(path for entry in shapes.values() for path in entry["paths"]))
    lines.append("| shape | " + " | ".join(paths) + " |")
    lines.append("|---" * (len(paths) + 1) + "|")
    for name, entry in shapes.items():
        cells = []
        for path_name in paths:
            row = entry["paths"].get(path_name)
            if row is None:
                cells.append("–")
                continue
            ratio_text = f" ({entry['x_cudnn'][path_name]:.2f}×)" if path_name in entry.get("x_cudnn", {}) else ""
            cells.append(f"{row['ms']:.2f}{ratio_text}, {row['rel_err']:.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


INT8_GEMM_COLUMNS = (
    ("bf16 linear", "bf16 linear"),
    ("fp8 _scaled_mm", "fp8 _scaled_mm alone"),
    ("int8 _int_mm", "int8 _int_mm alone"),
    ("int8 Triton GEMM + epilogue", "int8 Triton GEMM+epilogue alone"),
    ("rotate + round", "int8 rotate+round alone"),
    ("int8 linear, _int_mm + scale pass", "int8 linear today (_int_mm + scale pass)"),
    ("**int8 linear, Triton GEMM**", "int8 linear, Triton GEMM"),
)


def int8_gemm_table(path: Path, data: dict) -> str:
    """``bench/bench_int8_gemm.py``: where a rotated int8 linear's time goes, per DiT shape, in ms."""
    titles = " | ".join(title for title, _ in INT8_GEMM_COLUMNS)
    lines = [
        "**Rotated int8 linear, piece by piece** (ms per call, bf16 activations, rotation groups of 256):",
        "",
        f"| shape (M×K×N) | {titles} |",
        "|---|" + "---|" * len(INT8_GEMM_COLUMNS),
    ]
    for row in data["rows"]:
        m, k, n = row["mkn"]
        cells = [f"{row['ms'][key]:.3f}" for _, key in INT8_GEMM_COLUMNS]
        lines.append(f"| {row['shape']} {m}×{k}×{n} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", context_line(path, data)])


def gpu_tests_table(path: Path, data: dict) -> str:
    counts = data["counts"]
    lines = [
        "**GPU test suite** (`tools/run_gpu_tests.sh`: `pytest -m gpu tests/test_gpu*.py`):",
        "",
        "| GPU | torch | triton | commit | passed | failed | skipped |",
        "|---|---|---|---|---|---|---|",
        f"| {data.get('gpu', '?')} | {data.get('torch', '?')} | {data.get('triton', '?')} | {data.get('commit', '?')} "
        f"| {counts['passed']} | {counts['failed']} | {counts['skipped']} |",
    ]
    if data.get("failed"):
        lines += ["", "Failed: " + ", ".join(f"`{name}`" for name in data["failed"])]
    return "\n".join([*lines, "", context_line(path, {key: data.get(key) for key in ("date", "notes")})])


def linear_host_table(path: Path, data: dict) -> str:
    """``bench/bench_linear_host.py``: us per call of one linear at few rows (the host's cost), by path and shape."""
    shapes = sorted({(row["width"], row["rows"]) for row in data["results"]})
    paths = list(dict.fromkeys(row["path"] for row in data["results"]))
    cell = {(row["path"], row["width"], row["rows"]): row for row in data["results"]}
    header = " | ".join(f"K=N={width}, {rows} rows" for width, rows in shapes)
    lines = [
        "**Host cost of one linear** (`bench/bench_linear_host.py`: calls queued back to back, median of interleaved "
        "rounds; µs per call, × bf16 `F.linear` of the same run):",
        "",
        f"| path | {header} |",
        "|---|" + "---|" * len(shapes),
    ]
    for name in paths:
        values = []
        for width, rows in shapes:
            row = cell.get((name, width, rows))
            values.append(f"{row['us_per_call']:.0f} ({row['x_bf16']:.2f}×)" if row else "–")
        lines.append(f"| {name} | " + " | ".join(values) + " |")
    return "\n".join([*lines, "", context_line(path, {"gpu": data.get("device"), "torch": data.get("torch"),
                                                         "date": data.get("date")})])  # fmt: skip


def linear_host_parts_table(path: Path, data: dict) -> str:
    """The pieces of one of our calls (``bench_linear_host.py --parts``) and the one-launch sweep, where present."""
    pieces = [row for row in data.get("parts", []) if "piece" in row]
    sweep = [row for row in data.get("parts", []) if row.get("sweep")]
    lines: list[str] = []
    if pieces:
        shapes = sorted({(row["width"], row["rows"]) for row in pieces})
        cell = {(row["piece"], row["width"], row["rows"]): row for row in pieces}
        lines += ["**What one call costs the host, piece by piece** (each piece queued alone; µs, × bf16 `F.linear`):",
                  "", "| piece | " + " | ".join(f"K=N={w}, {r} rows" for w, r in shapes) + " |",
                  "|---|" + "---|" * len(shapes)]  # fmt: skip
        for name in dict.fromkeys(row["piece"] for row in pieces):
            values = [cell.get((name, w, r)) for w, r in shapes]
            lines.append(f"| {name} | " + " | ".join(
                f"{v['us_per_call']:.1f} ({v['x_bf16']:.2f}×)" if v else "–" for v in values) + " |")  # fmt: skip
    regimes = [row for row in sweep if "one launch us" in row]
    if regimes:
        names = [key[: -len(" us")] for key in regimes[0] if key.endswith(" us")]
        lines += ["", "**A call's three paths** (a layer's queued call, auto static, each path forced; µs):", "",
                  "| K=N | rows | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]  # fmt: skip
        lines += [f"| {row['width']} | {row['rows']} | " + " | ".join(f"{row[name + ' us']:.1f}" for name in names)
                  + " |" for row in regimes]  # fmt: skip
    elif sweep:
        lines += ["", "**One launch or two** (a layer's queued call, auto static; µs):", "",
                  "| K=N | rows | one launch | two launches | two / one |", "|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {row['width']} | {row['rows']} | {row['one_launch_us']:.1f} | {row['two_launches_us']:.1f} | "
                  f"{row['speedup']:.2f}× |" for row in sweep]  # fmt: skip
    return "\n".join(lines)


def one_launch_tiles_table(path: Path, data: dict) -> str:
    """``bench/bench_one_launch_tiles.py``: GPU µs of the one-launch linear's best tile, beside the two launches."""
    lines = [
        "**One-launch fp8 linear, GPU time** (`bench/bench_one_launch_tiles.py`: 20 calls in a CUDA graph, median "
        "of replays; µs per call):",
        "",
        "| K=N | rows | bf16 `F.linear` | two launches | one launch, best tile | best tile |",
        "|---|---|---|---|---|---|",
    ]
    for row in data["results"]:
        tile, us = min(row["one_launch_us"].items(), key=lambda item: item[1])
        lines.append(f"| {row['width']} | {row['rows']} | {row['bf16_us']:.1f} | {row['two_launches_us']:.1f} | "
                     f"{us:.1f} | {tile} |")  # fmt: skip
    return "\n".join([*lines, "", context_line(path, {"gpu": data.get("device"), "torch": data.get("torch"),
                                                         "date": data.get("date")})])  # fmt: skip


def one_launch_variants_table(path: Path, data: dict) -> str:
    """``bench/bench_one_launch_variants.py``: the best tile of each kernel family (GPU µs) and the wall time per
    call of the fastest of each path."""
    families = ("as the pack", "prologue", "codes GEMM")
    lines = [
        "**One launch or a Triton GEMM on codes** (`bench/bench_one_launch_variants.py`: GPU µs, 20 calls in a CUDA "
        "graph, best tile per kernel; wall µs per call, eager, host included, the bench's own calls rather than a "
        "layer's prepared call):",
        "",
        "| K=N | rows | bf16 | quantizer + `_scaled_mm` | quantizer alone | "
        + " | ".join(f"{name}, best tile" for name in families) + " | "
        + " | ".join(f"wall, {name}" for name in ("bf16", "quantizer + `_scaled_mm`", "quantizer + Triton GEMM",
                                                  "one launch (prologue)")) + " |",
        "|---|---|---|---|---|" + "---|" * (len(families) + 4),
    ]
    for row in data["results"]:
        best = []
        for family in families:
            mine = [(k, v["us"]) for k, v in row["variants"].items() if k.startswith(family)]
            best.append(f"{min(us for _, us in mine):.1f}" if mine else "–")
        wall = list(row.get("wall_us", {}).values()) + [None] * 4
        lines.append(f"| {row['width']} | {row['rows']} | {row['bf16_us']:.1f} | {row['two_launches_us']:.1f} | "
                     f"{row['quantizer_us']:.1f} | " + " | ".join(best) + " | "
                     + " | ".join(f"{v:.1f}" if v is not None else "–" for v in wall[:4]) + " |")  # fmt: skip
    return "\n".join([*lines, "", context_line(path, {"gpu": data.get("device"), "torch": data.get("torch"),
                                                         "date": data.get("date")})])  # fmt: skip


def cpu_formats_table(path: Path, data: dict) -> str:
    """``bench/bench_cpu_formats.py``: one linear's error and time per 8-bit form on a CPU."""
    names = list(dict.fromkeys(name for row in data["rows"] for name in row["paths"]))
    lines = [
        "**8-bit forms on a CPU** (`bench/bench_cpu_formats.py`: one linear, weights with channel spread and large "
        "input columns, inputs with outliers; error vs float32, ms and × float32 `F.linear`):",
        "",
        "| shape (rows×in×out) | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for row in data["rows"]:
        cells = [row["paths"].get(name) for name in names]
        lines.append(f"| {row['shape']} | " + " | ".join(
            f"{c['rel_err']:.4f}, {c['ms']:.0f} ms ({c['x_float32']:.2f}×)" if c else "–" for c in cells) + " |")
    context = {"torch": data.get("torch"), "date": data.get("date")}
    return "\n".join([*lines, "", context_line(path, context) + f" {data.get('threads')} thread(s)."])


def accumulation_model_table(path: Path, data: dict) -> str:
    """``bench/lowbit_attention_accumulation.py``: the modelled error of the 8-bit attention per accumulation."""
    names = list(dict.fromkeys(row["accumulation"] for row in data["rows"]))
    cases = list(dict.fromkeys((row["inputs"], row["keys"]) for row in data["rows"]))
    cell = {(row["inputs"], row["keys"], row["accumulation"]): row["rel_err"] for row in data["rows"]}
    lines = [
        "**8-bit attention, a CPU model of its fp8 P x V accumulation** (`bench/lowbit_attention_accumulation.py`: "
        "relative error vs float64 attention; each MMA step of 32 keys keeps the given bits, chained through the "
        "accumulator over all keys or restarted per key block):",
        "",
        "| inputs | keys | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for inputs, keys in cases:
        lines.append(f"| {inputs} | {keys} | " + " | ".join(f"{cell[(inputs, keys, name)]:.4f}" for name in names)
                     + " |")  # fmt: skip
    return "\n".join([*lines, "", context_line(path, {"torch": data.get("torch"), "date": data.get("date")})])


def render_file(path: Path) -> tuple[int, str]:
    """(0 for a model step, 1 for single layers, 2 for loading, 3 for text encoders, 4 for test runs: the order on
    the page; the table)."""
    try:
        data = json.loads(path.read_text())
        if isinstance(data, list):
            data = {"rows": data}
        if "results" in data and "preset" in data:
            return 0, step_table(path, data)
        if "summary" in data and "runs" in data:
            return 2, load_table(path, data)
        if "encoder" in data and "runs" in data:
            return 3, prepare_table(path, data)
        if "model" in data and "runs" in data:
            return 3, text_encoder_quality_table(path, data)
        if "paths" in data:
            return 3, text_encoder_speed_table(path, data)
        if "shapes" in data:
            return 1, attention_table(path, data)
        if data.get("kind") == "gemm-variants":
            return 1, gemm_variants_table(path, data)
        if data.get("kind") == "gpu-tests":
            return 4, gpu_tests_table(path, data)
        if data.get("kind") == "linear-host":
            parts = linear_host_parts_table(path, data)
            return 1, linear_host_table(path, data) + (f"\n\n{parts}" if parts else "")
        if data.get("kind") == "one-launch-tiles":
            return 1, one_launch_tiles_table(path, data)
        if data.get("kind") == "one-launch-variants":
            return 1, one_launch_variants_table(path, data)
        if data.get("kind") == "cpu-formats":
            return 1, cpu_formats_table(path, data)
        if data.get("kind") == "attention-accumulation-model":
            return 1, accumulation_model_table(path, data)
        if data.get("kind") == "int8-gemm":
            return 1, int8_gemm_table(path, data)
        if "rows" in data:
            return 1, linear_table(path, data)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ResultError(f"{path}: not a benchmark result this script knows ({error!r})") from None
    raise ResultError(f"{path}: not a result of the scripts in bench/")


def render(results: Path = RESULTS) -> str:
    """The page's generated section: every result file's table, step results first, or the placeholder."""
    files = sorted(results.glob("*.json")) if results.is_dir() else []
    if not files:
        return PLACEHOLDER
    tables = sorted((render_file(path) for path in files), key=lambda kind_table: kind_table[0])
    return "\n\n".join(table for _, table in tables)


def replace_section(page: str, section: str) -> str:
    if page.count(START) != 1 or page.count(END) != 1 or page.index(START) > page.index(END):
        raise ResultError(f"{PAGE}: needs one {START} ... {END} pair")
    head, rest = page.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{section}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is not what this would write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        current = PAGE.read_text()
        wanted = replace_section(current, render())
    except ResultError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.check:
        if wanted != current:
            print(f"error: {PAGE}: the tables are stale; run python tools/render_bench_table.py")
            return 1
        return 0
    PAGE.write_text(wanted)
    logger.info("wrote the tables of %s", PAGE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
