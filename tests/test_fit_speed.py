"""The quality recipe's preparation cost (issue 24): the sensitivity pass hands back the blocks ahead of each layer
from the reference run (same errors, fewer block calls), and the fitted result is kept on disk under a key of the
encoder's tensors, the samples and the settings (a second fit of the same encoder runs it zero times)."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import outlier_input
from torch import nn

from fp8_quant import clone_module_tree
from fp8_quant.block_replay import BlockReplay
from fp8_quant.calibration import run_samples
from fp8_quant.fp8_utils import quantize_weight
from fp8_quant.scheme import PER_CHANNEL
from fp8_quant.sensitivity import measure_sensitivity
from fp8_quant.text_encoder import quantize_text_encoder


class Blocks(nn.Module):
    """Residual blocks in a ModuleList. ``in_place``: the block output is changed in place after the call (as
    ``h += x`` does); ``passes``: the whole list runs that many times (blocks called more than once per sample)."""

    def __init__(self, width: int = 48, depth: int = 4, in_place: bool = False, passes: int = 1) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.embed = nn.Linear(width, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)) for _ in range(depth)
        )
        self.head = nn.LayerNorm(width)
        self.in_place, self.passes = in_place, passes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for _ in range(self.passes):
            for block in self.blocks:
                h = block(x)
                if self.in_place:
                    h += x
                    x = h
                else:
                    x = x + h
        return self.head(x)


def samples(count: int = 4, width: int = 48) -> list[dict]:
    return [{"x": outlier_input(12 + 3 * i, width, seed=40 + i) / 20} for i in range(count)]


def call(model, **sample):
    return model(**sample)


def layers_of(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks")}


def sensitivities(model: nn.Module, replay: bool) -> tuple[list[float], int]:
    """Each block linear's sensitivity, and how many times the block linears ran during the pass."""
    layers = layers_of(model)
    rounded = {n: quantize_weight(m.weight.detach(), torch.float8_e4m3fn, PER_CHANNEL) for n, m in layers.items()}
    probe = samples()
    references = run_samples(model, probe, call)
    recorded = BlockReplay.record(model, layers, probe, call) if replay else None
    assert (recorded is not None) == replay
    calls = [0]
    handles = [m.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for m in layers.values()]
    try:
        results = measure_sensitivity(model, layers, rounded, probe, call, references, replay=recorded)
    finally:
        for handle in handles:
            handle.remove()
    return [r.error for r in results], calls[0]


@pytest.mark.parametrize(
    "kind", [{}, {"in_place": True}, {"passes": 2}], ids=["plain", "in-place residual", "blocks run twice"]
)
def test_replayed_blocks_give_the_same_sensitivities_with_fewer_calls(kind):
    model = Blocks(**kind)
    full, full_calls = sensitivities(model, replay=False)
    replayed, replayed_calls = sensitivities(model, replay=True)
    assert all(e > 1e-5 for e in full)  # every layer moves the output: a replayed own block would read 0
    assert replayed == pytest.approx(full, rel=1e-6, abs=1e-9)
    depth, layers_per_block, probe = 4, 2, 4
    # Without replay every measured layer runs all 8 block linears per sample; with it, a layer in block j runs
    # the linears of blocks j.. (in the first pass; the second pass of "blocks run twice" runs in full).
    passes = kind.get("passes", 1)
    assert full_calls == len(full) * depth * layers_per_block * probe * passes
    ran = [(depth - j) + depth * (passes - 1) for j in range(depth)]  # blocks run per sample, layer in block j
    assert replayed_calls == sum(layers_per_block * r * probe * layers_per_block for r in ran)


def test_nothing_is_replayed_without_block_lists():
    model = nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 48))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert BlockReplay.record(model, layers, [{"input": outlier_input(8, 48, seed=1)}], call) is None


def counting(model: nn.Module) -> list[int]:
    runs = [0]
    model.register_forward_pre_hook(lambda *_: runs.__setitem__(0, runs[0] + 1))
    return runs


def fit(model: nn.Module, cache_dir, **options):
    copy = clone_module_tree(model)
    runs = counting(copy)
    options = {"budget": 0.7, **options}
    report = quantize_text_encoder(copy, samples(6), recipe="quality", cache_dir=cache_dir, **options)
    return copy, report, runs[0]


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def test_a_stored_fit_is_used_without_running_the_encoder(tmp_path):
    model = Blocks()
    first, first_report, first_runs = fit(model, tmp_path)
    second, second_report, second_runs = fit(model, tmp_path)
    assert first_runs > 20 and second_runs == 0
    assert len(list(tmp_path.glob("fit-*.safetensors"))) == 1
    assert "(the stored fit)" in second_report.notes[-1] and "(fitted, kept on disk)" in first_report.notes[-1]
    assert second_report.sensitivity.kept == first_report.sensitivity.kept != []
    a, b = weights(first), weights(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)
    x = outlier_input(10, 48, seed=9) / 20
    with torch.no_grad():
        assert torch.equal(first(x), second(x))


def test_another_encoder_samples_or_setting_is_fitted_again(tmp_path):
    model = Blocks()
    fit(model, tmp_path)
    changed = clone_module_tree(model)
    with torch.no_grad():  # a small merged LoRA on one layer
        changed.blocks[2][0].weight[3].add_(1e-3)
    assert fit(changed, tmp_path)[2] > 0
    assert fit(model, tmp_path, budget=0.8)[2] > 0
    assert fit(model, tmp_path, sensitivity_samples=2)[2] > 0
    assert fit(model, tmp_path)[2] == 0  # the first one is still there (three kept)


def test_only_the_most_recent_fits_are_kept(tmp_path, monkeypatch):
    import fp8_quant.fit_cache as fit_cache

    monkeypatch.setattr(fit_cache, "MAX_ENTRIES", 2)
    model = Blocks()
    for budget in (0.7, 0.8, 0.9):
        fit(model, tmp_path, budget=budget)
    assert len(list(tmp_path.glob("fit-*.safetensors"))) == 2
    assert fit(model, tmp_path, budget=0.9)[2] == 0 and fit(model, tmp_path, budget=0.7)[2] > 0


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other model"])
def test_a_damaged_or_foreign_stored_fit_is_fitted_again(tmp_path, caplog, damage):
    model = Blocks()
    first, _, _ = fit(model, tmp_path)
    (path,) = tmp_path.glob("fit-*.safetensors")
    if damage == "garbage":
        path.write_bytes(b"\x00" * 64)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    else:  # a fit of another model written under this one's name
        other = tmp_path / "other"
        fit(Blocks(depth=3), other)
        (foreign,) = other.glob("fit-*.safetensors")
        path.write_bytes(foreign.read_bytes())
    with caplog.at_level(logging.WARNING, logger="fp8_quant.fit_cache"):
        again, _, runs = fit(model, tmp_path)
    assert runs > 0
    assert any("not usable" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    a, b = weights(first), weights(again)
    assert all(torch.equal(a[k].float(), b[k].float()) for k in a)
    assert fit(model, tmp_path)[2] == 0  # rewritten whole


def test_a_fit_that_cannot_be_kept_is_still_used(tmp_path, caplog):
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the folder should be")
    with caplog.at_level(logging.WARNING, logger="fp8_quant.fit_cache"):
        _, report, runs = fit(Blocks(), blocked)
    assert runs > 0 and report.sensitivity.kept
    assert any("could not keep the fit" in r.getMessage() for r in caplog.records)
    assert blocked.read_text() == "a file where the folder should be"


def test_the_key_reads_tensors_past_float_precision():
    """A tensor of more than 2^24 values (a T5-XXL feed-forward weight has 4e7): the sampled positions stay in it
    and a change at its very end changes the key."""
    from fp8_quant.fit_cache import fit_key

    model = nn.Linear(4097, 4100, bias=False)  # 16 797 700 values
    with torch.no_grad():
        model.weight.zero_()
    before = fit_key(model, [], {})
    with torch.no_grad():
        model.weight[-1, -1] = 1.0
    assert fit_key(model, [], {}) != before
