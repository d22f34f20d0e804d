"""Print how many tests of each file passed, failed and skipped, from pytest's JUnit XML report.

CI's log then shows by name that the ComfyUI server, in-process and browser tests ran, which pytest -q's dots
do not. Usage: python .ci/outcomes.py REPORT.xml
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict


def outcome(case: ET.Element) -> str:
    if case.find("failure") is not None or case.find("error") is not None:
        return "failed"
    return "skipped" if case.find("skipped") is not None else "passed"


def main(report: str) -> None:
    counts: dict[str, Counter] = defaultdict(Counter)
    for case in ET.parse(report).iter("testcase"):
        parts = case.get("classname", "?").split(".")
        while len(parts) > 1 and parts[-1].startswith("Test"):  # a test class, not a module
            parts.pop()
        counts["/".join(parts) + ".py"][outcome(case)] += 1
    for module, counter in sorted(counts.items()):
        print(f"{module}: " + ", ".join(f"{counter[kind]} {kind}" for kind in ("passed", "failed", "skipped")))


if __name__ == "__main__":
    main(sys.argv[1])
