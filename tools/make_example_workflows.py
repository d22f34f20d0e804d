"""Write example_workflows/*.json (the graph editor's format) and their API-format twins.

Run: python tools/make_example_workflows.py. The graphs are described once here, as API prompts plus node
positions, so the two formats cannot drift apart.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "example_workflows"

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
    "weight_granularity": "channel",
    "kernel": "auto",
    "skip_layers": "",
}
TE_DEFAULTS = {
    "activation_scheme": "auto",
    "activation_granularity": "auto",
    "weight_granularity": "auto",
    "kernel": "auto",
    "skip_layers": "",
    "recipe": "quality",
}


def wan_t2v() -> tuple[dict, dict]:
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
    positions = {
        "1": (0, 0),
        "2": (380, 0),
        "3": (0, 260),
        "4": (380, 260),
        "5": (760, 160),
        "6": (760, 420),
        "7": (760, 680),
        "8": (1200, 0),
        "9": (1200, 520),
        "10": (1560, 0),
        "11": (1800, 0),
    }
    return prompt, positions


def flux_t2i() -> tuple[dict, dict]:
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
    positions = {
        "1": (0, 0),
        "2": (0, 260),
        "3": (380, 260),
        "4": (760, 160),
        "5": (1100, 160),
        "6": (760, 420),
        "7": (760, 680),
        "8": (1400, 0),
        "9": (1400, 520),
        "10": (1760, 0),
        "11": (2000, 0),
    }
    return prompt, positions


def to_ui(prompt: dict, positions: dict) -> dict:
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
        entry = {
            "id": int(key),
            "type": kind,
            "pos": list(positions[key]),
            "size": [340, 130],
            "flags": {},
            "order": order,
            "mode": 0,
            "inputs": inputs_of[key],
            "outputs": outputs,
            "properties": {"Node name for S&R": kind},
            "widgets_values": [node["inputs"][name] for name in WIDGETS[kind]],
        }
        if kind in TITLES:
            entry["title"] = TITLES[kind]
        nodes.append(entry)
    return {
        "last_node_id": max(int(k) for k in prompt),
        "last_link_id": link_id,
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
        "version": 0.4,
    }


def api(prompt: dict) -> dict:
    return {
        key: {
            "class_type": node["class_type"],
            "inputs": {k: v for k, v in node["inputs"].items() if k != "control_after_generate"},
        }
        for key, node in prompt.items()
    }


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, build in (("wan2.1_t2v_fp8", wan_t2v), ("flux_t2i_fp8", flux_t2i)):
        prompt, positions = build()
        (OUT / f"{name}.json").write_text(json.dumps(to_ui(prompt, positions), indent=1) + "\n")
        (OUT / "api").mkdir(exist_ok=True)
        (OUT / "api" / f"{name}.json").write_text(json.dumps(api(prompt), indent=1) + "\n")


if __name__ == "__main__":
    main()
