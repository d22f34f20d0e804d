"""tools/gpu_test_summary.py --merge: a suite run in parts (a lent GPU for a few minutes at a time) joins into one
summary with the counts, files and failures of all parts, and refuses parts from different GPUs or commits."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import gpu_test_summary


def part(files: dict[str, tuple[int, int, int]], failed: list[str], gpu: str = "H200", seconds: float = 10.0):
    counts = [sum(c[i] for c in files.values()) for i in range(3)]
    return {
        "kind": "gpu-tests", "gpu": gpu, "torch": "2.11", "triton": "3.6", "date": "2026-12-03", "seconds": seconds,
        "counts": dict(zip(("passed", "failed", "skipped"), counts)),
        "files": {name: dict(zip(("passed", "failed", "skipped"), c)) for name, c in files.items()},
        "failed": failed,
    }  # fmt: skip


def test_parts_join_into_one_summary(tmp_path):
    paths = []
    for index, data in enumerate((part({"a.py": (3, 0, 1)}, []), part({"b.py": (2, 1, 0)}, ["b.py::t"], seconds=5))):
        paths.append(tmp_path / f"{index}.json")
        paths[-1].write_text(json.dumps(data))
    out = tmp_path / "all.json"
    assert gpu_test_summary.main(["--merge", *map(str, paths), str(out)]) == 0
    merged = json.loads(out.read_text())
    assert merged["counts"] == {"passed": 5, "failed": 1, "skipped": 1}
    assert merged["failed"] == ["b.py::t"] and sorted(merged["files"]) == ["a.py", "b.py"]
    assert merged["seconds"] == 15.0 and merged["parts"] == 2


def test_parts_from_other_gpus_or_the_same_file_twice_are_refused():
    with pytest.raises(ValueError, match="gpu"):
        gpu_test_summary.merge([part({"a.py": (1, 0, 0)}, []), part({"b.py": (1, 0, 0)}, [], gpu="H100")])
    with pytest.raises(ValueError, match="a.py"):
        gpu_test_summary.merge([part({"a.py": (1, 0, 0)}, []), part({"a.py": (1, 0, 0)}, [])])
