"""Example workflows: both formats agree, links are consistent, and our nodes' widgets are in input order."""

import json
from pathlib import Path

import pytest

from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from nodes.widgets import loader_optional_inputs, text_encoder_optional_inputs

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
WIDGET_ORDER = {
    "LoadFP8DiT": ["unet_name", *loader_optional_inputs()],
    "QuantizeTextEncoderFP8": list(text_encoder_optional_inputs()),
}


def test_there_are_wan_and_flux_workflows():
    names = {path.stem.lower() for path in WORKFLOWS}
    assert any("wan" in name for name in names) and any("flux" in name for name in names)


def test_each_file_name_reads_as_the_card_title():
    """The Templates browser titles a pack's templates with their file names (issue 24: no raw names)."""
    for path in WORKFLOWS:
        words = path.stem.split(" ")
        assert len(words) >= 3 and "_" not in path.stem and path.stem[0].isupper(), path.stem
        assert (path.parent / "api" / path.name).is_file()


def test_the_thumbnails_tell_apart():
    """Each card's picture has a band of its own colour (not two near-identical screenshots of dark graphs)."""
    image = pytest.importorskip("PIL.Image")
    bands = []
    for path in WORKFLOWS:
        with image.open(path.with_suffix(".jpg")) as thumbnail:
            rgb = thumbnail.convert("RGB")
            width, height = rgb.size
            band = rgb.crop((0, round(height * 0.9), width, height)).resize((1, 1), image.BOX).getpixel((0, 0))
        bands.append(band)
    assert all(max(a) - min(a) > 60 for a in bands), bands  # coloured, not grey
    assert all(sum(abs(x - y) for x, y in zip(a, b)) > 150 for i, a in enumerate(bands) for b in bands[i + 1 :])


def test_node_names_are_stable():
    assert set(NODE_CLASS_MAPPINGS) == {"LoadFP8DiT", "QuantizeTextEncoderFP8", "SaveFP8Model", "PatchAttentionFP8"}
    assert NODE_DISPLAY_NAME_MAPPINGS == {
        "LoadFP8DiT": "Load FP8 DiT",
        "QuantizeTextEncoderFP8": "Quantize Text Encoder (FP8)",
        "SaveFP8Model": "Save FP8 Model",
        "PatchAttentionFP8": "Patch Attention (8-bit pack)",
    }


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_ui_workflow_is_consistent_with_api_twin(path):
    ui = json.loads(path.read_text())
    api = json.loads((path.parent / "api" / path.name).read_text())
    nodes = {node["id"]: node for node in ui["nodes"]}
    assert {str(i) for i in nodes} == set(api)
    assert {node["type"] for node in ui["nodes"]} >= {"LoadFP8DiT", "QuantizeTextEncoderFP8"}
    for link_id, source, source_slot, target, target_slot, kind in ui["links"]:
        assert link_id in nodes[source]["outputs"][source_slot]["links"]
        target_input = nodes[target]["inputs"][target_slot]
        assert target_input["link"] == link_id and target_input["type"] == kind
        assert api[str(target)]["inputs"][target_input["name"]] == [str(source), source_slot]
    for node in ui["nodes"]:
        if node["type"] in WIDGET_ORDER:
            inputs = api[str(node["id"])]["inputs"]
            widgets = [inputs[name] for name in WIDGET_ORDER[node["type"]]]
            assert node["widgets_values"] == widgets


def _rect(node: dict) -> tuple[float, float, float, float]:
    title = 30  # the graph editor draws each node's title bar above its position
    (x, y), (width, height) = node["pos"], node["size"]
    return x, y - title, width, height + title


def _meet(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _inside(inner, outer) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and all(
        inner[i] + inner[i + 2] <= outer[i] + outer[i + 2] for i in (0, 1)
    )


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_ui_workflow_is_laid_out_in_titled_groups_without_overlaps(path):
    """The layout as stored; tests/integration/test_browser.py checks it again as the real frontend draws it."""
    ui = json.loads(path.read_text())
    rects = [_rect(node) for node in ui["nodes"]]
    groups = [group["bounding"] for group in ui["groups"]]
    assert all(group["title"] for group in ui["groups"])
    assert not [(a, b) for i, a in enumerate(rects) for b in rects[i + 1 :] if _meet(a, b)]
    assert not [(a, b) for i, a in enumerate(groups) for b in groups[i + 1 :] if _meet(a, b)]
    assert all(sum(_inside(rect, group) for group in groups) == 1 for rect in rects)
    assert min(group[0] for group in groups) >= 80 and min(group[1] for group in groups) >= 120, "under the menus"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_each_workflow_has_a_small_jpeg_thumbnail_for_the_templates_browser(path):
    thumbnail = path.with_suffix(".jpg")  # the name ComfyUI's Templates browser asks for
    data = thumbnail.read_bytes()
    assert data[:3] == b"\xff\xd8\xff" and len(data) < 100_000


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_our_nodes_in_the_examples_use_the_node_defaults(path):
    """The examples show what a new node gives (the defaults are the recommended settings), read from the widget
    definitions the nodes' INPUT_TYPES return (optional inputs) rather than from the generator's copy of them."""
    optional_inputs = {"LoadFP8DiT": loader_optional_inputs, "QuantizeTextEncoderFP8": text_encoder_optional_inputs}
    ui = json.loads(path.read_text())
    for node in ui["nodes"]:
        if node["type"] not in WIDGET_ORDER:
            continue
        optional = optional_inputs[node["type"]]()
        for name, value in zip(WIDGET_ORDER[node["type"]], node["widgets_values"]):
            if name in optional:
                assert value == optional[name][1]["default"], (path.name, node["type"], name, value)


FILE_WIDGETS = {"unet_name", "clip_name", "clip_name1", "clip_name2", "vae_name"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_model_file_is_named_with_its_folder(path):
    """Each file a loader asks for is in the node's ``properties.models`` (ComfyUI's frontend offers it for
    download), with the models/ folder it goes in."""
    ui = json.loads(path.read_text())
    api = json.loads((path.parent / "api" / path.name).read_text())
    folders = {"unet_name": "diffusion_models", "clip_name": "text_encoders", "clip_name1": "text_encoders",
               "clip_name2": "text_encoders", "vae_name": "vae"}  # fmt: skip
    for node in ui["nodes"]:
        inputs = api[str(node["id"])]["inputs"]
        wanted = {inputs[name]: folders[name] for name in FILE_WIDGETS if name in inputs}
        listed = {model["name"]: model for model in node["properties"].get("models", [])}
        assert set(listed) == set(wanted), node["type"]
        for name, folder in wanted.items():
            assert listed[name]["directory"] == folder
            assert listed[name]["url"].startswith("https://huggingface.co/") and listed[name]["url"].endswith(name)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_the_saved_view_shows_every_node_in_a_1600x900_window(path):
    ui = json.loads(path.read_text())
    scale, (dx, dy) = ui["extra"]["ds"]["scale"], ui["extra"]["ds"]["offset"]
    for node in ui["nodes"]:
        x, y, width, height = _rect(node)
        left, top = (x + dx) * scale, (y + dy) * scale
        right, bottom = (x + width + dx) * scale, (y + height + dy) * scale
        assert 0 <= left and right <= 1600 and 0 <= top and bottom <= 900, (node["type"], left, top, right, bottom)
    assert scale >= 0.35  # still readable
