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
    names = {path.stem for path in WORKFLOWS}
    assert any("wan" in name for name in names) and any("flux" in name for name in names)


def test_node_names_are_stable():
    assert set(NODE_CLASS_MAPPINGS) == {"LoadFP8DiT", "QuantizeTextEncoderFP8", "SaveFP8Model"}
    assert NODE_DISPLAY_NAME_MAPPINGS == {
        "LoadFP8DiT": "Load FP8 DiT",
        "QuantizeTextEncoderFP8": "Quantize Text Encoder (FP8)",
        "SaveFP8Model": "Save FP8 Model",
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
