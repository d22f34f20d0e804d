"""The pack in ComfyUI's real frontend, in a headless Chromium driven by Playwright.

The test ComfyUI serves its own frontend (the ``comfyui-frontend-package`` of its requirements) with this pack's
web extension. Checked as a user meets them: both example workflows open from the pack's templates with no
missing node, every node of the pack with its widgets, nothing overlapping and nothing under the menus; a graph
with both nodes of the pack runs from the Run button, each node then shows its whole summary, read-only, without
growing over its neighbours; the same graph run again is served from ComfyUI's cache (a summary sent back as an
input would change the nodes' cache key); and the workflow as saved holds no summary.

Screenshots go to tests/integration/artifacts/ (``workflow-<name>.png`` feed the templates' thumbnails:
``python tools/make_example_workflows.py --thumbnails tests/integration/artifacts``).

Needs Playwright (``pip install playwright``) and a Chromium: ``FP8_CHROMIUM`` (default ``/usr/bin/chromium``,
Debian's package); Playwright's own browser download is not used.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.parse
from collections.abc import Iterator
from itertools import combinations
from pathlib import Path

import pytest
from conftest import ARTIFACTS, COMFYUI_DIR, REPO, SKIP_REASON, ComfyServer, skip_unless_required, write_fixture
from prompts import our_loader, sampling_prompt

try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright
except ImportError:  # the page fixture skips (or fails, where required) with the reason
    PlaywrightTimeout = TimeoutError
    sync_playwright = None

pytestmark = [pytest.mark.comfyui, pytest.mark.skipif(not COMFYUI_DIR, reason=SKIP_REASON)]

CHROMIUM = os.environ.get("FP8_CHROMIUM", "/usr/bin/chromium")
# Headless, and none of Chromium's own network traffic (sign-in, updates, field trials): the machine may be
# offline, and the test must see only the ComfyUI it talks to.
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1600, "height": 900}
PACK_FOLDER = "comfyui-fp8-quant"  # the name conftest links the pack under
PACK_NODES = ("LoadFP8DiT", "QuantizeTextEncoderFP8")
SUMMARY_WIDGET = "fp8_summary"
EXAMPLES = sorted(path.stem for path in (REPO / "example_workflows").glob("*.json"))
MODEL_FOLDERS = {"unet_name": "diffusion_models", "vae_name": "vae"}  # clip_name*: text_encoders
READY = "() => window.app?.graph && window.LiteGraph?.registered_node_types?.LoadFP8DiT && app.canvas?.ds"
PAGE_HELPERS = Path(__file__).with_name("browser_helpers.js").read_text()


def model_files(api_prompt: dict) -> Iterator[tuple[str, str]]:
    """(models subfolder, file name) of every model a prompt loads."""
    for node in api_prompt.values():
        for name, value in node["inputs"].items():
            if name in MODEL_FOLDERS:
                yield MODEL_FOLDERS[name], value
            elif name.startswith("clip_name"):
                yield "text_encoders", value


@pytest.fixture(scope="module")
def browser_dit(comfyui: ComfyServer) -> str:
    """A tiny bf16 Wan DiT for Load FP8 DiT, there before the page opens (the page lists the files it finds)."""
    name = "browser_wan_bf16.safetensors"
    write_fixture("wan", comfyui.models / "diffusion_models" / name)
    return name


@pytest.fixture(scope="module")
def page(comfyui: ComfyServer, browser_dit: str):
    """A Chromium page on the test ComfyUI, with empty stand-ins for the example workflows' model files (the
    frontend marks a workflow whose model names it does not find) and the first-run template dialog off."""
    if sync_playwright is None:
        skip_unless_required("Playwright is not installed (pip install playwright)")
    if not Path(CHROMIUM).is_file():
        skip_unless_required(f"{CHROMIUM}: no Chromium there (apt-get install chromium, or set FP8_CHROMIUM)")
    for example in EXAMPLES:
        api_prompt = json.loads((REPO / "example_workflows" / "api" / f"{example}.json").read_text())
        for folder, name in model_files(api_prompt):
            (comfyui.models / folder).mkdir(parents=True, exist_ok=True)
            (comfyui.models / folder / name).touch()
    settings = comfyui.base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    ARTIFACTS.mkdir(exist_ok=True)
    profile = comfyui.base / "chromium-profile"
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True, viewport=VIEWPORT
        )
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(f"{error.message}\n{error.stack}"))
        page.goto(comfyui.url)
        page.wait_for_function(READY, timeout=120_000)
        page.add_script_tag(content=PAGE_HELPERS)
        yield page
        context.close()
    shutil.rmtree(profile, ignore_errors=True)
    assert not [error for error in errors if "fp8_quant.js" in error], errors  # uncaught in our extension


def overlapping(rects: dict[str, list[float]]) -> list[tuple[str, str]]:
    def meet(a: list[float], b: list[float]) -> bool:
        return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]

    return [(a, b) for a, b in combinations(rects, 2) if meet(rects[a], rects[b])]


def inside(inner: list[float], outer: list[float]) -> bool:
    return (
        outer[0] <= inner[0]
        and outer[1] <= inner[1]
        and inner[0] + inner[2] <= outer[0] + outer[2]
        and inner[1] + inner[3] <= outer[1] + outer[3]
    )


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_workflow_opens_cleanly(page, comfyui, example):
    """Loaded from the pack's templates route, as the Templates browser loads it."""
    url = f"/api/workflow_templates/{PACK_FOLDER}/{example}.json"
    saved = json.loads((REPO / "example_workflows" / f"{example}.json").read_text())
    state = page.evaluate("(url) => fp8.openTemplate(url)", url)
    nodes = {node["id"]: node for node in state["nodes"]}
    assert not [node["type"] for node in nodes.values() if not node["registered"]], "missing node types"
    node_defs = comfyui.get("/object_info")
    for node in saved["nodes"]:
        if node["type"] in PACK_NODES:
            order = node_defs[node["type"]]["input_order"]
            widget_inputs = [name for name in order["required"] + order.get("optional", []) if name != "clip"]
            shown = nodes[str(node["id"])]
            assert shown["widgets"] == [*widget_inputs, SUMMARY_WIDGET], shown
            assert shown["values"][: len(widget_inputs)] == node["widgets_values"], shown
    assert overlapping({key: node["rect"] for key, node in nodes.items()}) == []
    groups = state["groups"]
    assert overlapping({group["title"]: group["rect"] for group in groups}) == []
    for node in nodes.values():
        assert sum(inside(node["rect"], group["rect"]) for group in groups) == 1, (node["type"], groups)
        assert node["size"][1] >= node["min_size"][1], (node["type"], "smaller than its widgets")
        # Title bar and corners, on screen and on the canvas (not under a menu, side bar or toast).
        assert all(hit == "canvas" for hit in node["hits"]), (node["type"], node["hits"])
    page.screenshot(path=str(ARTIFACTS / f"workflow-{example}.png"), clip=state["clip"])


def test_templates_browser_shows_each_example_with_its_thumbnail_and_opens_it(page):
    """ComfyUI lists a pack's example_workflows/*.json under the pack's name and asks for ``<name>.jpg`` beside
    each (the frontend shows a stand-in picture where that fails, so the responses are what is checked)."""
    thumbnails: dict[str, tuple[int, str]] = {}

    def record(response) -> None:
        if f"/workflow_templates/{PACK_FOLDER}/" in response.url and response.url.endswith(".jpg"):
            name = urllib.parse.unquote(response.url.rsplit("/", 1)[1])
            thumbnails[name] = (response.status, response.headers.get("content-type", ""))

    page.on("response", record)
    page.evaluate("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.get_by_text(PACK_FOLDER, exact=True).click()
    for example in EXAMPLES:
        card = page.get_by_test_id(f"template-workflow-{example}")
        assert example in card.inner_text(), card.inner_text()  # the title the card shows
        thumbnail = card.locator("img")
        thumbnail.wait_for()
        loaded = "(img) => img.complete && img.naturalWidth > 0"
        page.wait_for_function(loaded, arg=thumbnail.element_handle(), timeout=30_000)
    page.remove_listener("response", record)
    assert thumbnails == {f"{example}.jpg": (200, "image/jpeg") for example in EXAMPLES}
    page.get_by_test_id(f"template-workflow-{EXAMPLES[0]}").click()
    saved = json.loads((REPO / "example_workflows" / f"{EXAMPLES[0]}.json").read_text())
    expected = sorted(node["type"] for node in saved["nodes"])
    page.wait_for_function(
        "(types) => JSON.stringify(app.graph.nodes.map((n) => n.type).sort()) === JSON.stringify(types)",
        arg=expected,
        timeout=30_000,
    )


def browser_prompt(dit: str) -> dict:
    """Load FP8 DiT into a tiny sampling run, and Quantize Text Encoder between a tiny T5 and CLIPTextEncode."""
    prompt = sampling_prompt(our_loader(dit), "browser_latent")
    prompt["11"] = {"class_type": "FP8TestTinyTextEncoder", "inputs": {"family": "t5", "seed": 11, "storage": "bf16"}}
    prompt["12"] = {"class_type": "QuantizeTextEncoderFP8", "inputs": {"clip": ["11", 0]}}
    prompt["13"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["12", 0], "text": "a red fox in the snow"}}
    prompt["14"] = {"class_type": "FP8TestSaveConditioning", "inputs": {"conditioning": ["13", 0], "name": "browser"}}
    return prompt


def run_from_ui(page, comfyui: ComfyServer, timeout: float = 300) -> tuple[str, dict]:
    """Press Run; wait for the prompt it queued to finish; its id and history entry."""
    before = set(comfyui.get("/history"))
    page.get_by_test_id("queue-button").click()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = {key: entry for key, entry in comfyui.get("/history").items() if key not in before}
        done = {key: entry for key, entry in new.items() if entry.get("status", {}).get("completed") is not None}
        if done:
            assert len(new) == 1, f"one press of Run queued {len(new)} prompts"
            return next(iter(done.items()))
        time.sleep(0.2)
    raise TimeoutError(f"the prompt queued from the page did not finish in {timeout}s")


def cached_nodes(entry: dict) -> set[str]:
    return {
        str(node) for kind, data in entry["status"]["messages"] if kind == "execution_cached" for node in data["nodes"]
    }


def summaries_shown(page, summaries: dict[str, str]) -> bool:
    """Whether every pack node shows its summary; the ``executed`` message reaches the page on its own time."""
    try:
        page.wait_for_function("(expected) => fp8.summariesShown(expected)", arg=summaries, timeout=30_000)
    except PlaywrightTimeout:
        return False
    return True


def click_each_summary(page, state: dict) -> dict[str, dict]:
    """Click into each summary (the old text widget opened a "Value" prompt there): what the page shows next."""
    after_click = {}
    for key, shown in state["summaries"].items():
        if "center" not in shown:
            continue  # no box to click
        page.mouse.click(*shown["center"])
        dialog = page.evaluate("() => fp8.promptDialogOpen()")
        page.keyboard.press("Escape")
        after_click[key] = {"dialog": dialog, "text": page.evaluate("(id) => fp8.summaryText(id)", key)}
    return after_click


@pytest.fixture(scope="module")
def two_runs(page, comfyui, browser_dit) -> dict:
    """A graph with both nodes of the pack, loaded into the page and run twice from the Run button, unchanged."""
    prompt = browser_prompt(browser_dit)
    pack_ids = sorted(key for key, node in prompt.items() if node["class_type"] in PACK_NODES)
    before = page.evaluate("(prompt) => fp8.loadApiPrompt(prompt)", prompt)
    _, first = run_from_ui(page, comfyui)
    assert first["status"]["status_str"] == "success", json.dumps(first["status"])[:2000]
    summaries = {key: first["outputs"][key]["text"][0] for key in pack_ids}
    shown = summaries_shown(page, summaries)
    after = page.evaluate("(ids) => fp8.summaryState(ids)", pack_ids)
    clicked = click_each_summary(page, after)
    page.screenshot(path=str(ARTIFACTS / "summary.png"))
    second_id, second = run_from_ui(page, comfyui)
    return {
        "pack_ids": pack_ids,
        "before": before,
        "first": first,
        "summaries": summaries,
        "shown": shown,
        "after": after,
        "clicked": clicked,
        "second": second,
        "second_id": second_id,
    }


def test_pack_nodes_show_their_whole_summary(two_runs):
    assert two_runs["shown"], "the summaries did not appear on the nodes"
    for key, summary in two_runs["summaries"].items():
        shown = two_runs["after"]["summaries"][key]
        assert shown["text"] == summary  # the whole text, as the server sent it
        assert shown["scroll_height"] <= shown["client_height"], shown  # all of it in view, no scrolling


def test_summary_is_read_only_and_moves_no_node(two_runs):
    before, after = two_runs["before"]["rects"], two_runs["after"]["rects"]
    assert overlapping(before) == []
    for key, summary in two_runs["summaries"].items():
        shown = two_runs["after"]["summaries"][key]
        assert shown["tag"] not in ("INPUT", "TEXTAREA") and not shown["editable"], shown
        assert two_runs["clicked"].get(key) == {"dialog": False, "text": summary}, "a click opened an editor"
    pack_ids = two_runs["pack_ids"]
    assert {key: after[key] for key in pack_ids} == {key: before[key] for key in pack_ids}, "a node resized"
    assert overlapping(after) == [], "a node grew over another"


def test_unchanged_second_run_is_served_from_cache(two_runs):
    first, second = two_runs["first"], two_runs["second"]
    assert second["status"]["status_str"] == "success", json.dumps(second["status"])[:2000]
    pack_ids = two_runs["pack_ids"]
    assert not cached_nodes(first) & set(pack_ids), "the first run must execute the pack's nodes"
    sent = second["prompt"][2]
    for key in pack_ids:
        assert sent[key]["inputs"] == first["prompt"][2][key]["inputs"], "the page sent the summary back as an input"
    assert set(pack_ids) <= cached_nodes(second), (two_runs["second_id"], second["status"]["messages"])
    assert cached_nodes(second) == set(sent), "an unchanged graph comes entirely from the cache"


def test_saved_workflow_holds_no_summary(two_runs):
    summaries = two_runs["summaries"].values()
    workflows = dict(two_runs["after"]["workflows"])
    workflows["workflow sent with the prompt (saved into outputs)"] = two_runs["second"]["prompt"][3]["extra_pnginfo"]
    for label, workflow in workflows.items():
        text = json.dumps(workflow)
        assert SUMMARY_WIDGET not in text and all(summary not in text for summary in summaries), label
