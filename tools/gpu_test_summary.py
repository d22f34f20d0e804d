"""Summarise a GPU test run (pytest's JUnit XML report) as a result file in bench/results/.

Written by ``tools/run_gpu_tests.sh``; ``tools/render_bench_table.py`` shows it on the benchmarks page, so the
last run of the GPU suite before a kernel change is kept beside the measurements. Usage:
``python tools/gpu_test_summary.py REPORT.xml OUT.json [--seconds S]``; ``--merge PART.json ... OUT.json`` joins the
summaries of a suite run in parts (a machine lent for a few minutes at a time runs it file by file).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KIND = "gpu-tests"


def outcome(case: ET.Element) -> str:
    if case.find("failure") is not None or case.find("error") is not None:
        return "failed"
    return "skipped" if case.find("skipped") is not None else "passed"


def test_id(case: ET.Element) -> str:
    module = case.get("classname", "?").replace(".", "/")
    return f"{module}.py::{case.get('name', '?')}"


def environment() -> dict[str, str]:
    """The GPU and the versions the run used (each one absent where it cannot be read)."""
    info: dict[str, str] = {"python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = str(torch.version.cuda)
            capability = torch.cuda.get_device_capability(0)
            info["capability"] = f"{capability[0]}.{capability[1]}"
    except ImportError:
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    info.update(commit_of_tree())
    return info


def commit_of_tree() -> dict[str, str]:
    """``{"commit": ...}``: ``FP8_GPU_TEST_COMMIT`` where set (a copy of a working tree whose ``.git`` is not that
    tree's, as on a lent machine), else the checkout's short HEAD, marked ``-dirty`` where tracked files differ from
    it; ``{}`` without git."""
    given = os.environ.get("FP8_GPU_TEST_COMMIT", "").strip()
    if given:
        return {"commit": given}
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        if head.returncode != 0:
            return {}
        clean = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--"], capture_output=True)
    except OSError:
        return {}
    return {"commit": head.stdout.strip() + ("" if clean.returncode == 0 else "-dirty")}


def summarise(report: Path, seconds: float | None = None) -> dict:
    cases = list(ET.parse(report).iter("testcase"))
    counts = Counter(outcome(case) for case in cases)
    by_file: dict[str, Counter] = {}
    for case in cases:
        by_file.setdefault(test_id(case).split("::")[0], Counter())[outcome(case)] += 1
    return {
        "kind": KIND,
        **environment(),
        "date": datetime.date.today().isoformat(),
        "seconds": round(seconds, 1) if seconds is not None else None,
        "counts": {key: counts[key] for key in ("passed", "failed", "skipped")},
        "files": {
            name: {key: c[key] for key in ("passed", "failed", "skipped")} for name, c in sorted(by_file.items())
        },
        "failed": [test_id(case) for case in cases if outcome(case) == "failed"],
    }


def merge(parts: list[dict]) -> dict:
    """One summary of a suite run in parts on one GPU with one set of versions (else a ValueError naming both)."""
    first = parts[0]
    for part in parts[1:]:
        for key in ("gpu", "torch", "triton", "cuda", "commit"):
            if part.get(key) != first.get(key):
                raise ValueError(f"parts ran with different {key}: {first.get(key)!r} and {part.get(key)!r}")
    files: dict[str, dict] = {}
    for part in parts:
        for name, counts in part["files"].items():
            if name in files:
                raise ValueError(f"{name} is in two parts")
            files[name] = counts
    seconds = [part.get("seconds") for part in parts]
    return {
        **first,
        "date": max(part["date"] for part in parts),
        "seconds": round(sum(seconds), 1) if None not in seconds else None,
        "parts": len(parts),
        "counts": {key: sum(part["counts"][key] for part in parts) for key in ("passed", "failed", "skipped")},
        "files": dict(sorted(files.items())),
        "failed": [test for part in parts for test in part["failed"]],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", type=Path, nargs="+", help="REPORT.xml OUT.json (--merge: PART.json ... OUT.json)")
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--merge", action="store_true")
    args = parser.parse_args(argv)
    *sources, out = args.inputs
    if not sources or (len(sources) > 1 and not args.merge):
        parser.error("give one REPORT.xml and OUT.json, or --merge PART.json ... OUT.json")
    try:
        if args.merge:
            summary = merge([json.loads(path.read_text()) for path in sources])
        else:
            summary = summarise(sources[0], args.seconds)
    except (OSError, ValueError, KeyError, ET.ParseError) as error:
        parser.exit(2, f"gpu_test_summary: {error}\n")
    args.out = out
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    counts = summary["counts"]
    print(
        f"{summary.get('gpu', 'no GPU')}: {counts['passed']} passed, {counts['failed']} failed, "
        f"{counts['skipped']} skipped -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
