"""Without a ComfyUI the integration tests skip, each with one short, true line: not a paragraph 67 times, and
never a reason about a ComfyUI version when there is no ComfyUI at all."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_integration_skip_reasons_without_comfyui_are_short_and_true():
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_DIR", "FP8_REQUIRE_COMFYUI", "COMFYUI_OLD_DIR")}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/integration"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    reasons = [m.group(1) for m in re.finditer(r"^SKIPPED \[\d+\] [^:]+:\d+: (.*)$", run.stdout, re.MULTILINE)]
    assert reasons, run.stdout[-2000:]
    assert set(reasons) == {"COMFYUI_DIR not set (see README: Test)"}, set(reasons)
