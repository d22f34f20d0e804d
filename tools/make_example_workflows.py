"""Write example_workflows/*.json (the graph editor's format), their API-format twins, and their thumbnails.

Run: python tools/make_example_workflows.py [--thumbnails DIR]. The graphs are described once here, as API
prompts plus the stages they are shown in, so the two formats cannot drift apart. Each stage is one column of
nodes inside a titled group; columns run left to right in the order the data flows, and every node gets the
height the graph editor gives it, so nothing overlaps when the workflow opens.

Thumbnails: ComfyUI lists a pack's ``example_workflows/*.json`` in its Templates browser and asks for a
same-named ``.jpg`` beside each (``/api/workflow_templates/<pack>/<name>.jpg``). The browser test
(tests/integration/test_browser.py) screenshots each example as the real frontend shows it into
tests/integration/artifacts/; ``--thumbnails tests/integration/artifacts`` turns those into small JPEGs
(needs Pillow, which ComfyUI's own environment has).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

OUT = Path(__file__).resolve().parents[1] / "example_workflows"
Stage = tuple[str, list[str]]  # group title, node keys top to bottom

# Body heights (below the title bar) that ComfyUI's frontend 1.47 gives each node for its widgets, rounded up;
# this pack's nodes include their summary box. A text prompt gets room for a few lines.
NODE_HEIGHTS = {
    "LoadFP8DiT": 410,
    "QuantizeTextEncoderFP8": 379,
    "CLIPLoader": 106,
    "DualCLIPLoader": 130,
    "CLIPTextEncode": 150,
    "ModelSamplingSD3": 58,
    "FluxGuidance": 58,
    "VAELoader": 58,
    "EmptyHunyuanLatentVideo": 130,
    "EmptySD3LatentImage": 106,
    "KSampler": 262,
    "VAEDecode": 46,
    "SaveAnimatedWEBP": 300,  # and its preview once it has run
    "SaveImage": 300,
}
WIDE_COLUMN, NARROW_COLUMN = 400, 320  # this pack's nodes and prompts need room for their text
NODE_TITLE = 30  # the title bar above each node's position
GROUP_TITLE = 50  # a group's title bar and the space below it
PADDING, NODE_GAP, GROUP_GAP = 20, 30, 40
# Where the first group starts and the zoom the workflow opens at: clear of the frontend's tab bar, side bar and
# run button, and small enough that the whole graph fits a 1600x900 window (the browser test checks both).
ORIGIN = (100, 140)
VIEW_SCALE = 0.75  # at most; smaller where the graph would not fit VIEW_FIT
VIEW_FIT = (1600, 900)  # the window the saved view must show the whole graph in
# Screen pixels the frontend covers at each edge (left, top, right, bottom): its side bar, top menu and toolbars.
VIEW_MARGINS = (90, 110, 40, 70)
_WAN = "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files"
_FLUX_TE = "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main"
_FLUX = "https://huggingface.co/black-forest-labs/FLUX.1-dev/resolve/main"
# The model files the examples name: their folder under ComfyUI's models/ and where they are published. Written into
# each loader node's ``properties.models``, which ComfyUI's frontend reads to offer missing files for download.
MODEL_FILES = {
    "wan2.1_t2v_14B_fp8_scaled.safetensors": ("diffusion_models", f"{_WAN}/diffusion_models"),
    "umt5_xxl_fp16.safetensors": ("text_encoders", f"{_WAN}/text_encoders"),
    "wan_2.1_vae.safetensors": ("vae", f"{_WAN}/vae"),
    "flux1-dev.safetensors": ("diffusion_models", _FLUX),
    "clip_l.safetensors": ("text_encoders", _FLUX_TE),
    "t5xxl_fp16.safetensors": ("text_encoders", _FLUX_TE),
    "ae.safetensors": ("vae", _FLUX),
}
GROUP_COLOR = "#3f789e"

# Output types of the nodes used, in slot order, and the order of their widgets in the frontend.
OUTPUTS = {
    "LoadFP8DiT": ["MODEL"],
    "QuantizeTextEncoderFP8": ["CLIP"],
    "CLIPLoader": ["CLIP"],
    "DualCLIPLoader": ["CLIP"],
    "CLIPTextEncode": ["CONDITIONING"],
    "ModelSamplingSD3": ["MODEL"],
    "FluxGuidance": ["CONDITIONING"],
    "VAELoader": ["VAE"],
    "EmptyHunyuanLatentVideo": ["LATENT"],
    "EmptySD3LatentImage": ["LATENT"],
    "KSampler": ["LATENT"],
    "VAEDecode": ["IMAGE"],
    "SaveAnimatedWEBP": [],
    "SaveImage": [],
}
WIDGETS = {
    "LoadFP8DiT": [
        "unet_name",
        "activation_scheme",
        "activation_granularity",
        "weight_granularity",
        "kernel",
        "skip_layers",
        "attention",
        "quant_format",
    ],
    "QuantizeTextEncoderFP8": [
        "activation_scheme",
        "activation_granularity",
        "weight_granularity",
        "kernel",
        "skip_layers",
        "recipe",
    ],
    "CLIPLoader": ["clip_name", "type", "device"],
    "DualCLIPLoader": ["clip_name1", "clip_name2", "type", "device"],
    "CLIPTextEncode": ["text"],
    "ModelSamplingSD3": ["shift"],
    "FluxGuidance": ["guidance"],
    "VAELoader": ["vae_name"],
    "EmptyHunyuanLatentVideo": ["width", "height", "length", "batch_size"],
    "EmptySD3LatentImage": ["width", "height", "batch_size"],
    "KSampler": ["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
    "VAEDecode": [],
    "SaveAnimatedWEBP": ["filename_prefix", "fps", "lossless", "quality", "method"],
    "SaveImage": ["filename_prefix"],
}
TITLES = {"LoadFP8DiT": "Load FP8 DiT", "QuantizeTextEncoderFP8": "Quantize Text Encoder (FP8)"}
LOAD_DEFAULTS = {
    "activation_scheme": "auto",
    "activation_granularity": "auto",
    "weight_granularity": "auto",
    "kernel": "auto",
    "skip_layers": "",
    "attention": "auto",
    "quant_format": "auto",
}
TE_DEFAULTS = {
    "activation_scheme": "auto",
    "activation_granularity": "auto",
    "weight_granularity": "auto",
    "kernel": "auto",
    "skip_layers": "",
    "recipe": "quality",
}


STAGE_TITLES = ("1 · Load models", "2 · Text encoder to FP8, prompts", "3 · Sample", "4 · Decode and save")


def stages(*columns: list[str]) -> list[Stage]:
    """Every example shows the same stages, one column of node keys each, in STAGE_TITLES' order."""
    if len(columns) != len(STAGE_TITLES):
        raise ValueError(f"{len(columns)} columns for {len(STAGE_TITLES)} stages")
    return list(zip(STAGE_TITLES, columns))


def wan_t2v() -> tuple[dict, list[Stage]]:
    prompt = {
        "1": {
            "class_type": "LoadFP8DiT",
            "inputs": {"unet_name": "wan2.1_t2v_14B_fp8_scaled.safetensors", **LOAD_DEFAULTS},
        },
        "2": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 8.0}},
        "3": {
            "class_type": "CLIPLoader",
            "inputs": {"clip_name": "umt5_xxl_fp16.safetensors", "type": "wan", "device": "default"},
        },
        "4": {"class_type": "QuantizeTextEncoderFP8", "inputs": {"clip": ["3", 0], **TE_DEFAULTS}},
        "5": {
            "class_type": "CLIPTextEncode",
            "inputs": {
                "clip": ["4", 0],
                "text": "a red fox running through fresh snow in a pine forest, golden hour, cinematic",
            },
        },
        "6": {
            "class_type": "CLIPTextEncode",
            "inputs": {"clip": ["4", 0], "text": "blurry, low quality, static, distorted"},
        },
        "7": {
            "class_type": "EmptyHunyuanLatentVideo",
            "inputs": {"width": 832, "height": 480, "length": 33, "batch_size": 1},
        },
        "8": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["2", 0],
                "positive": ["5", 0],
                "negative": ["6", 0],
                "latent_image": ["7", 0],
                "seed": 42,
                "control_after_generate": "fixed",
                "steps": 30,
                "cfg": 6.0,
                "sampler_name": "uni_pc",
                "scheduler": "simple",
                "denoise": 1.0,
            },
        },
        "9": {"class_type": "VAELoader", "inputs": {"vae_name": "wan_2.1_vae.safetensors"}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["9", 0]}},
        "11": {
            "class_type": "SaveAnimatedWEBP",
            "inputs": {
                "images": ["10", 0],
                "filename_prefix": "wan_fp8",
                "fps": 16.0,
                "lossless": False,
                "quality": 90,
                "method": "default",
            },
        },
    }
    return prompt, stages(["1", "3", "9"], ["4", "5", "6"], ["2", "7", "8"], ["10", "11"])


def flux_t2i() -> tuple[dict, list[Stage]]:
    prompt = {
        "1": {"class_type": "LoadFP8DiT", "inputs": {"unet_name": "flux1-dev.safetensors", **LOAD_DEFAULTS}},
        "2": {
            "class_type": "DualCLIPLoader",
            "inputs": {
                "clip_name1": "clip_l.safetensors",
                "clip_name2": "t5xxl_fp16.safetensors",
                "type": "flux",
                "device": "default",
            },
        },
        "3": {"class_type": "QuantizeTextEncoderFP8", "inputs": {"clip": ["2", 0], **TE_DEFAULTS}},
        "4": {
            "class_type": "CLIPTextEncode",
            "inputs": {"clip": ["3", 0], "text": "a lighthouse on a cliff at dawn, dramatic clouds, photograph"},
        },
        "5": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["4", 0], "guidance": 3.5}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 0], "text": ""}},
        "7": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "8": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "positive": ["5", 0],
                "negative": ["6", 0],
                "latent_image": ["7", 0],
                "seed": 42,
                "control_after_generate": "fixed",
                "steps": 20,
                "cfg": 1.0,
                "sampler_name": "euler",
                "scheduler": "simple",
                "denoise": 1.0,
            },
        },
        "9": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["9", 0]}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "flux_fp8"}},
    }
    return prompt, stages(["1", "2", "9"], ["3", "4", "6"], ["5", "7", "8"], ["10", "11"])


def layout(prompt: dict, stages: list[Stage]) -> tuple[dict[str, tuple[list[int], list[int]]], list[dict]]:
    """Position and size of every node, and the titled groups around each stage's column."""
    placed: dict[str, tuple[list[int], list[int]]] = {}
    groups = []
    left = ORIGIN[0]
    for title, keys in stages:
        types = [prompt[key]["class_type"] for key in keys]
        width = WIDE_COLUMN if set(types) & {*TITLES, "CLIPTextEncode"} else NARROW_COLUMN
        top = ORIGIN[1] + GROUP_TITLE
        for key, kind in zip(keys, types):
            top += NODE_TITLE
            placed[key] = ([left + PADDING, top], [width, NODE_HEIGHTS[kind]])
            top += NODE_HEIGHTS[kind] + NODE_GAP
        group_width = width + 2 * PADDING
        bounding = [left, ORIGIN[1], group_width, top - NODE_GAP + PADDING - ORIGIN[1]]
        groups.append({"title": title, "bounding": bounding, "color": GROUP_COLOR, "font_size": 24, "flags": {}})
        left += group_width + GROUP_GAP
    missing = set(prompt) - set(placed)
    if missing:
        raise ValueError(f"nodes in no stage: {sorted(missing)}")
    return placed, groups


def to_ui(prompt: dict, stages: list[Stage]) -> dict:
    placed, groups = layout(prompt, stages)
    nodes, links = [], []
    link_id = 0
    outgoing: dict[tuple[str, int], list[int]] = {}
    inputs_of: dict[str, list[dict]] = {key: [] for key in prompt}
    for key, node in prompt.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                link_id += 1
                source, slot = value
                kind = OUTPUTS[prompt[source]["class_type"]][slot]
                links.append([link_id, int(source), slot, int(key), len(inputs_of[key]), kind])
                outgoing.setdefault((source, slot), []).append(link_id)
                inputs_of[key].append({"name": name, "type": kind, "link": link_id})
    for order, (key, node) in enumerate(prompt.items()):
        kind = node["class_type"]
        outputs = [
            {"name": out, "type": out, "links": outgoing.get((key, slot), []), "slot_index": slot}
            for slot, out in enumerate(OUTPUTS[kind])
        ]
        position, size = placed[key]
        entry = {
            "id": int(key),
            "type": kind,
            "pos": position,
            "size": size,
            "flags": {},
            "order": order,
            "mode": 0,
            "inputs": inputs_of[key],
            "outputs": outputs,
            "properties": {"Node name for S&R": kind},
            "widgets_values": [node["inputs"][name] for name in WIDGETS[kind]],
        }
        models = [
            {"name": value, "url": f"{MODEL_FILES[value][1]}/{value}", "directory": MODEL_FILES[value][0]}
            for value in entry["widgets_values"]
            if isinstance(value, str) and value in MODEL_FILES
        ]
        if models:
            entry["properties"]["models"] = models
        if kind in TITLES:
            entry["title"] = TITLES[kind]
        nodes.append(entry)
    return {
        "last_node_id": max(int(k) for k in prompt),
        "last_link_id": link_id,
        "nodes": nodes,
        "links": links,
        "groups": groups,
        "config": {},
        "extra": {"ds": fitting_view(groups)},
        "version": 0.4,
    }


def fitting_view(groups: list[dict]) -> dict:
    """The saved view (the canvas's scale and offset, screen = (canvas + offset) * scale) that shows every group
    inside ``VIEW_FIT`` clear of the frontend's bars: the graph opens whole on a 1600x900 window."""
    left = min(group["bounding"][0] for group in groups)
    top = min(group["bounding"][1] for group in groups)
    right = max(group["bounding"][0] + group["bounding"][2] for group in groups)
    bottom = max(group["bounding"][1] + group["bounding"][3] for group in groups)
    margin_left, margin_top, margin_right, margin_bottom = VIEW_MARGINS
    room_x, room_y = VIEW_FIT[0] - margin_left - margin_right, VIEW_FIT[1] - margin_top - margin_bottom
    scale = round(min(VIEW_SCALE, room_x / (right - left), room_y / (bottom - top)), 4)
    return {"scale": scale, "offset": [margin_left / scale - left, margin_top / scale - top]}


def api(prompt: dict) -> dict:
    return {
        key: {
            "class_type": node["class_type"],
            "inputs": {k: v for k, v in node["inputs"].items() if k != "control_after_generate"},
        }
        for key, node in prompt.items()
    }


# The file names are the titles the Templates browser shows on each card (it has no other title for a pack's
# templates). Each card's picture: the graph as the frontend shows it, under a band in the model family's colour
# with the title and what comes out, so that the two cards tell apart at a glance.
WORKFLOWS = {"Wan 2.1 text to video (FP8)": wan_t2v, "Flux text to image (FP8)": flux_t2i}
CARDS = {  # name: (band colour, what the workflow makes)
    "Wan 2.1 text to video (FP8)": ((20, 110, 120), "VIDEO  ·  Wan 2.1 T2V 1.3B/14B"),
    "Flux text to image (FP8)": ((170, 80, 20), "IMAGE  ·  Flux.1 dev"),
}
THUMBNAIL_SIZE = (480, 360)


def write_thumbnails(screenshots: Path) -> None:
    """``<name>.jpg`` beside each workflow: the browser test's ``workflow-<name>.png`` screenshot, fitted to
    ``THUMBNAIL_SIZE``, with the card's band over its lower part."""
    from PIL import Image  # ComfyUI's environment has Pillow; the pack itself does not need it

    for name in WORKFLOWS:
        source = screenshots / f"workflow-{name}.png"
        if not source.is_file():
            raise SystemExit(f"error: {source}: no such screenshot; run the browser test first")
        with Image.open(source) as image:
            card = _card(image.convert("RGB"), name)
        card.save(OUT / f"{name}.jpg", quality=82, optimize=True)
        logger.info("wrote %s", OUT / f"{name}.jpg")


def _card(graph, name: str):
    from PIL import Image, ImageDraw, ImageOps

    width, height = THUMBNAIL_SIZE
    card = ImageOps.fit(graph, (width, height), Image.LANCZOS, centering=(0.5, 0.0))
    colour, kicker = CARDS[name]
    band_top = round(height * 0.56)
    overlay = Image.new("RGBA", (width, height - band_top), (*colour, 235))
    card.paste(overlay, (0, band_top), overlay)
    draw = ImageDraw.Draw(card)
    title = name.replace(" (FP8)", "")
    draw.text((24, band_top + 18), kicker, fill=(255, 255, 255), font=_font(17, bold=False))
    draw.text((24, band_top + 44), title, fill=(255, 255, 255), font=_font(_title_size(draw, title, width - 48)))
    badge = _font(22)
    draw.rounded_rectangle((width - 104, band_top + 16, width - 20, band_top + 50), 8, fill=(255, 255, 255))
    draw.text((width - 62, band_top + 33), "FP8", fill=colour, font=badge, anchor="mm")
    return card


def _title_size(draw, title: str, room: int) -> int:
    size = 40
    while size > 20 and draw.textlength(title, font=_font(size)) > room:
        size -= 2
    return size


def _font(size: int, bold: bool = True):
    """DejaVu Sans where the system has it, else Pillow's own scalable font."""
    from PIL import ImageFont

    dejavu = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    for name in (dejavu, f"/usr/share/fonts/truetype/dejavu/{dejavu}"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--thumbnails", type=Path, help="folder with the browser test's workflow-*.png")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    (OUT / "api").mkdir(parents=True, exist_ok=True)
    for name, build in WORKFLOWS.items():
        prompt, stages = build()
        (OUT / f"{name}.json").write_text(json.dumps(to_ui(prompt, stages), indent=1) + "\n")
        (OUT / "api" / f"{name}.json").write_text(json.dumps(api(prompt), indent=1) + "\n")
    if args.thumbnails:
        write_thumbnails(args.thumbnails)


if __name__ == "__main__":
    main()
