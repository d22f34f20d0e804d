"""How long Quantize Text Encoder (FP8) takes to prepare an encoder, inside a real ComfyUI (COMFYUI_DIR).

A random encoder of ComfyUI's own classes at a real size (CLIP-L: 12 layers, width 768; a half-size CLIP-L; T5-XXL
on a GPU), loaded through ComfyUI's text-encoder loader, then the node run per recipe: a cold fit (no fitted result
on disk), then the same node again in a new process's situation (the in-memory state dropped, the fitted result
read from the on-disk cache). Per run: seconds, and each phase's seconds as the recipe logs them.

Usage: COMFYUI_DIR=... python bench/te_prepare_time.py [--encoder clip-l|clip-l-half|t5-xxl] [--recipes quality]
       [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))

from comfy_runtime import import_pack, setup_comfy  # noqa: E402

ENCODERS = {
    # name: (test family, config overrides)
    "clip-l": (
        "clip_l",
        {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "projection_dim": 768,
        },
    ),
    "clip-l-half": (
        "clip_l",
        {
            "hidden_size": 384,
            "intermediate_size": 1536,
            "num_attention_heads": 6,
            "num_hidden_layers": 6,
            "projection_dim": 384,
        },
    ),
    "t5-xxl": ("t5xxl", {}),  # ComfyUI's own T5-XXL config, random weights made on the GPU (bench_comfy_te)
}


class _PhaseLog(logging.Handler):
    """Collects the recipe's phase lines ("fp8 text encoder: <phase> ... (N s so far)")."""

    PHASE = re.compile(r"fp8 text encoder: (.+?)(?:, \d+ layers)? \((\d+) s so far\)$")

    def __init__(self) -> None:
        super().__init__()
        self.marks: list[tuple[str, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = self.PHASE.match(record.getMessage())
        if match:
            self.marks.append((match.group(1), time.monotonic()))


def _phases(marks: list[tuple[str, float]], end: float) -> dict[str, float]:
    return {name: round(marks[i + 1][1] - t if i + 1 < len(marks) else end - t, 2) for i, (name, t) in enumerate(marks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", choices=sorted(ENCODERS), default="clip-l")
    parser.add_argument("--recipes", default="quality", help="comma-separated: quality, speed, plain")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    setup_comfy()
    import fp8_test_nodes
    import torch

    pack = import_pack(REPO)
    family, config = ENCODERS[args.encoder]
    if family == "t5xxl":
        import comfy.sd
        from bench_comfy_te import random_t5xxl_state_dict

        state = random_t5xxl_state_dict()

        def encoder():
            return comfy.sd.load_text_encoder_state_dicts([dict(state)], clip_type=comfy.sd.CLIPType.SD3)
    else:
        clip_type, option, _ = fp8_test_nodes.TINY_TEXT_ENCODERS[family]
        fp8_test_nodes.TINY_TEXT_ENCODERS[family] = (clip_type, option, config)

        def encoder():
            return fp8_test_nodes.tiny_text_encoder(family, seed=0)

    node = pack.NODE_CLASS_MAPPINGS["QuantizeTextEncoderFP8"]()
    cache_module = sys.modules["comfyui_fp8_quant.nodes.text_encoder"]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        if hasattr(cache_module, "fit_cache_directory"):
            cache_module.fit_cache_directory = lambda: Path(cache_dir)
        for recipe in args.recipes.split(","):
            for run in ("cold", "cached"):
                clip = encoder()
                handler = _PhaseLog()
                logging.getLogger().addHandler(handler)
                start = time.monotonic()
                output = node.quantize(clip, recipe=recipe)
                end = time.monotonic()
                logging.getLogger().removeHandler(handler)
                results[f"{recipe} {run}"] = {
                    "seconds": round(end - start, 2),
                    "phases": _phases(handler.marks, end),
                    "summary": output["ui"]["text"][0],
                }
                print(f"{recipe} {run}: {end - start:.1f} s", flush=True)
                if recipe == "plain":
                    break
    cpu = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    report = {
        "encoder": args.encoder,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "runs": results,
    }
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
