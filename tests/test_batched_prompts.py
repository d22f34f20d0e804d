"""Quantize Text Encoder's calibration prompts, encoded together where that gives the same activations (issue 24:
preparation time), against stand-ins with the call ComfyUI's text encoders have (``encode_token_weights``)."""

from __future__ import annotations

import torch
from torch import nn

from nodes.text_encoder import batched_samples


class JoiningEncoder(nn.Module):
    """Like ComfyUI's CLIP and T5 wrappers: the sections of a prompt encoded as one batch, joined along tokens."""

    def __init__(self, first_only: bool = False, pads: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(100, 16)
        self.mix = nn.Linear(16, 16)
        self.first_only, self.pads = first_only, pads
        self.calls = 0

    def encode_token_weights(self, tokens):
        self.calls += 1
        sections = tokens["l"][:1] if self.first_only else tokens["l"]
        length = max(len(s) for s in sections)
        ids = torch.tensor([[t[0] for t in s] + [0] * (length - len(s)) for s in sections])
        x = self.embed(ids)
        if self.pads:  # a batch-wide statistic: what a padded or masked batch would change
            x = x - x.mean(dim=(0, 1), keepdim=True)
        out = self.mix(x)
        return out.reshape(1, -1, 16), out[:1, 0]


def prompt(length: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"l": [[(int(t), 1.0) for t in torch.randint(1, 100, (length,), generator=generator)]]}


def test_prompts_of_equal_lengths_are_encoded_together_with_the_probe_prompts_first():
    prompts = [prompt(8, i) for i in range(6)] + [prompt(5, 10 + i) for i in range(3)] + [prompt(8, 20)]
    samples, probe = batched_samples(JoiningEncoder(), prompts, 4)
    assert probe == 1
    assert [len(s["tokens"]["l"]) for s in samples] == [4, 3, 3]  # first 4; then the 8-token ones; the 5-token ones
    model = JoiningEncoder()
    joined = torch.cat([model.encode_token_weights(p)[0] for p in prompts[:4]], dim=-2)
    assert torch.allclose(model.encode_token_weights(samples[0]["tokens"])[0], joined, atol=1e-6)


def test_an_encoder_that_does_not_join_sections_gets_one_prompt_a_sample():
    prompts = [prompt(8, i) for i in range(6)]
    for model in (JoiningEncoder(first_only=True), JoiningEncoder(pads=True)):
        samples, probe = batched_samples(model, prompts, 4)
        assert probe == 4 and [s["tokens"] for s in samples] == prompts


def test_weighted_or_multi_section_prompts_stay_alone():
    weighted = {"l": [[(5, 1.2), (6, 1.0)]]}
    long = {"l": [[(5, 1.0)] * 8, [(6, 1.0)] * 8]}
    prompts = [prompt(8, 0), weighted, prompt(8, 1), long, prompt(8, 2)]
    samples, probe = batched_samples(JoiningEncoder(), prompts, 4)
    assert probe == 3  # the two 8-token probe prompts together, the weighted and the long one alone
    assert samples[0]["tokens"]["l"] == prompts[0]["l"] + prompts[2]["l"]
    assert samples[1]["tokens"] is weighted and samples[2]["tokens"] is long
