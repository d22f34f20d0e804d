"""A heavy user's session against a real ComfyUI server: repeated loads and unloads, interrupts, a queue of mixed
prompts, a path that escapes the models folder, LoRA strengths. Bounded to a few minutes on a CPU.

Each check compares what the server returns, bit for bit where the computation is the same, and reads the server's
log for ComfyUI's own warnings (a "Potential memory leak" there is what users see).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import COMFYUI_DIR, SKIP_REASON, write_fixture
from prompts import sampling_prompt
from safetensors.torch import load_file, save_file

pytestmark = [pytest.mark.comfyui, pytest.mark.skipif(not COMFYUI_DIR, reason=SKIP_REASON)]

CYCLES = 20
LEAK_WARNING = "Potential memory leak"


@pytest.fixture(scope="module")
def wan(comfyui) -> str:
    return write_fixture("wan", comfyui.models / "diffusion_models" / "reliability_wan.safetensors").name


def ours(name: str, **options) -> dict:
    return {"class_type": "LoadFP8DiT", "inputs": {"unet_name": name, **options}}


def one_step(loader: dict, name: str, steps: int = 1, lora: str | None = None, strength: float = 1.0) -> dict:
    prompt = sampling_prompt(loader, name, lora=lora)
    prompt["5"]["inputs"]["steps"] = steps
    if lora is not None:
        prompt["7"]["inputs"]["strength_model"] = strength
    return prompt


def latent(comfyui, name: str) -> torch.Tensor:
    return load_file(str(comfyui.output / f"{name}.safetensors"))["samples"]


def succeeded(entry: dict) -> None:
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:2000]


def text_encoder_prompt(nonce: int) -> dict:
    return {
        "1": {"class_type": "FP8TestTinyTextEncoder", "inputs": {"family": "t5", "seed": 0, "storage": "bf16"}},
        "2": {"class_type": "QuantizeTextEncoderFP8", "inputs": {"clip": ["1", 0], "skip_layers": f"nonce{nonce}"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a red fox in the snow"}},
        "4": {
            "class_type": "FP8TestSaveConditioning",
            "inputs": {"conditioning": ["3", 0], "name": f"cycle_te_{nonce}"},
        },
    }


def test_load_unload_cycles_leave_no_leak_warning_and_no_growth(comfyui, wan):
    """20 DiT loads and 20 text-encoder quantizations, each a new model (a new option value), models freed between:
    no "Potential memory leak" from ComfyUI, resident memory flat from the second cycle on."""
    log_start = len(comfyui.log_text())
    rss = []
    for cycle in range(CYCLES):
        succeeded(comfyui.run(one_step(ours(wan, skip_layers=f"nonce{cycle}"), f"cycle_dit_{cycle}")))
        succeeded(comfyui.run(text_encoder_prompt(cycle)))
        comfyui.post("/free", {"unload_models": True, "free_memory": True})
        rss.append(comfyui.rss_bytes())
    log = comfyui.log_text()[log_start:]
    assert LEAK_WARNING not in log, log[log.index(LEAK_WARNING) - 500 :][:2000]
    growth = (max(rss[1:]) - rss[1]) / rss[1]
    assert growth <= 0.02, [round(value / 2**20) for value in rss]
    first, last = latent(comfyui, "cycle_dit_0"), latent(comfyui, f"cycle_dit_{CYCLES - 1}")
    assert torch.equal(first, last)


def test_interrupt_then_the_next_prompt_is_unaffected(comfyui, wan):
    succeeded(comfyui.run(one_step(ours(wan, skip_layers="interrupt-ref"), "interrupt_ref", steps=3)))
    prompt_id, error = comfyui.post_prompt(one_step(ours(wan, skip_layers="interrupted"), "interrupted", steps=2000))
    assert prompt_id is not None, error
    entry = comfyui.interrupt(prompt_id)
    assert entry["status"]["status_str"] == "error", json.dumps(entry["status"])[:2000]
    assert not (comfyui.output / "interrupted.safetensors").exists()
    succeeded(comfyui.run(one_step(ours(wan, skip_layers="after-interrupt"), "after_interrupt", steps=3)))
    assert torch.equal(latent(comfyui, "after_interrupt"), latent(comfyui, "interrupt_ref"))


def test_a_queue_of_mixed_prompts_gives_what_each_gives_alone(comfyui, wan):
    variants = {
        "queue_auto": ours(wan, skip_layers="queue-a"),
        "queue_weight_only": ours(wan, activation_scheme="none", skip_layers="queue-b"),
        "queue_stock": {"class_type": "UNETLoader", "inputs": {"unet_name": wan, "weight_dtype": "default"}},
        "queue_tensor": ours(wan, weight_granularity="tensor", skip_layers="queue-c"),
    }
    queued = {}
    for name, loader in variants.items():
        prompt_id, error = comfyui.post_prompt(one_step(loader, name, steps=2))
        assert prompt_id is not None, error
        queued[name] = prompt_id
    for prompt_id in queued.values():
        succeeded(comfyui.wait(prompt_id))
    together = {name: latent(comfyui, name) for name in variants}
    for name, loader in variants.items():
        succeeded(comfyui.run(one_step(loader, f"{name}_alone", steps=2)))
        assert torch.equal(together[name], latent(comfyui, f"{name}_alone")), name


@pytest.mark.parametrize("escape", ["../../../../etc/passwd", "/etc/passwd", "..\\..\\secret.safetensors"])
def test_a_path_outside_the_models_folder_is_refused(comfyui, escape):
    prompt_id, error = comfyui.post_prompt(one_step(ours(escape), "never_written"))
    assert prompt_id is None and "unet_name" in json.dumps(error), error
    assert not (comfyui.output / "never_written.safetensors").exists()


def test_lora_strengths_change_the_output_in_order_and_unpatching_restores_it(comfyui, wan):
    generator = torch.Generator().manual_seed(11)
    lora = {}
    for block in range(2):
        key = f"diffusion_model.blocks.{block}.ffn.0"
        lora[f"{key}.lora_down.weight"] = torch.randn(4, 256, generator=generator) * 0.2
        lora[f"{key}.lora_up.weight"] = torch.randn(512, 4, generator=generator) * 0.2
    save_file(lora, str(comfyui.models / "loras" / "reliability_lora.safetensors"))
    loader = ours(wan, skip_layers="lora-strengths")
    succeeded(comfyui.run(one_step(loader, "lora_none", steps=2)))
    base = latent(comfyui, "lora_none")
    changes = []
    for strength in (0.0, 0.5, 1.0, 4.0):
        name = f"lora_{strength}"
        succeeded(comfyui.run(one_step(loader, name, steps=2, lora="reliability_lora.safetensors", strength=strength)))
        changes.append(((latent(comfyui, name) - base).norm() / base.norm()).item())
    assert changes[0] == 0.0 and 0 < changes[1] < changes[2] < changes[3], changes
    succeeded(comfyui.run(one_step(loader, "lora_none_again", steps=2)))
    assert torch.equal(latent(comfyui, "lora_none_again"), base)  # the patched weights were put back exactly
