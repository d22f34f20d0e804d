"""API prompts the server tests and the browser test send: a tiny DiT through a loader into KSampler."""

from __future__ import annotations

SEED = 42

WAN_LATENT = {
    "class_type": "EmptyHunyuanLatentVideo",
    "inputs": {"width": 32, "height": 32, "length": 1, "batch_size": 1},
}
FLUX_LATENT = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
FLUX_INPUTS = {"latent": FLUX_LATENT, "pooled_width": 768}  # and Flux's pooled CLIP-L vector
# LTX-Video: 128 latent channels, 32x spatial and 8x temporal compression (a 2x2 latent of 2 frames)
LTXV_LATENT = {
    "class_type": "EmptyLTXVLatentVideo",
    "inputs": {"width": 64, "height": 64, "length": 9, "batch_size": 1},
}
LTXV_INPUTS = {"latent": LTXV_LATENT, "attention_mask": True}  # and the text mask LTX's encoders give


def sampling_prompt(
    loader: dict,
    name: str,
    lora: str | None = None,
    shift: float | None = None,
    latent: dict = WAN_LATENT,
    pooled_width: int = 0,
    seed: int = SEED,
    context_width: int = 4096,
    attention_mask: bool = False,
) -> dict:
    """``seed``: the sampler's (another seed also makes ComfyUI run the sampler again on a cached model);
    ``context_width``: the text conditioning's width (the model's text dimension)."""

    def conditioning(seed: int) -> dict:
        inputs = {"width": context_width, "tokens": 8, "seed": seed, "pooled_width": pooled_width}
        if attention_mask:
            inputs["attention_mask"] = True
        return {"class_type": "FP8TestRandomConditioning", "inputs": inputs}

    prompt = {
        "1": loader,
        "2": conditioning(1),
        "3": conditioning(2),
        "4": latent,
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "seed": seed,
                "steps": 4,
                "cfg": 2.0,
                "sampler_name": "euler",
                "scheduler": "simple",
                "denoise": 1.0,
            },
        },
        "6": {"class_type": "FP8TestSaveLatent", "inputs": {"samples": ["5", 0], "name": name}},
    }
    if lora is not None:
        prompt["7"] = {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": ["1", 0], "lora_name": lora, "strength_model": 1.0},
        }
        prompt["5"]["inputs"]["model"] = ["7", 0]
    if shift is not None:  # ModelSamplingSD3, as Wan and Flux workflows use it, after the loader (and LoRA)
        prompt["8"] = {
            "class_type": "ModelSamplingSD3",
            "inputs": {"model": prompt["5"]["inputs"]["model"], "shift": shift},
        }
        prompt["5"]["inputs"]["model"] = ["8", 0]
    return prompt


def stock_loader(name: str, weight_dtype: str = "default") -> dict:
    return {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": weight_dtype}}


def our_loader(name: str, **options) -> dict:
    return {"class_type": "LoadFP8DiT", "inputs": {"unet_name": name, **options}}
