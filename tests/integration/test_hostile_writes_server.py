"""Hostile workflow values in a real server: each is a bounded one-line answer and the next good prompt runs."""

from __future__ import annotations

import json
import time

import pytest
from conftest import COMFYUI_DIR, SKIP_REASON
from prompts import our_loader, sampling_prompt
from test_comfyui import sample, tiny_wan  # noqa: F401  (the module's fixture)

pytestmark = [pytest.mark.comfyui, pytest.mark.skipif(not COMFYUI_DIR, reason=SKIP_REASON)]


def test_hostile_skip_patterns_and_save_prefix_then_the_server_serves(comfyui, tiny_wan):  # noqa: F811
    start = time.monotonic()
    entry = comfyui.run(sampling_prompt(our_loader(tiny_wan, skip_layers="re:(.|b|.|.)*Z"), "hostile_nfa"), 120)
    assert entry["status"]["status_str"] == "success" and time.monotonic() - start < 120
    entry = comfyui.run(sampling_prompt(our_loader(tiny_wan, skip_layers=r"re:(a*)*\1"), "hostile_ref"), 60)
    messages = json.dumps(entry["status"]["messages"])
    assert entry["status"]["status_str"] == "error" and "skip_layers" in messages and "backreferences" in messages
    for prefix in ("../escape", "/tmp/escape"):
        node = {"class_type": "SaveFP8Model", "inputs": {"model": ["1", 0], "filename_prefix": prefix}}
        entry = comfyui.run({"1": our_loader(tiny_wan), "2": node}, 120)
        messages = json.dumps(entry["status"]["messages"])
        assert entry["status"]["status_str"] == "error" and "filename_prefix" in messages, messages
    assert sample(comfyui, our_loader(tiny_wan, skip_layers="blocks.0.nope"), "after_hostile").isfinite().all()
