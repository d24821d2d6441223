"""Tests of `ScenarioGenerator` (lightning_synth/generators/scenario.py)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from torch import Tensor

from lightning_synth.datasets import load_digits_tensors
from lightning_synth.generators.base import GenerationContext
from lightning_synth.generators.scenario import ScenarioGenerator, paste_distractor
from lightning_synth.perturbations import default_bank
from lightning_synth.profile import Weakness, WeaknessProfile

COMPOUND = re.compile(r"^perturbation/(?P<a>[a-z_]+)\+(?P<b>[a-z_]+)@(?P<level>[1-5])$")


def noop(value: int, n: int, context: GenerationContext) -> tuple[Tensor, Tensor]:
    return context.sample_real(n)


@pytest.fixture(scope="module")
def digits() -> tuple[Tensor, Tensor]:
    images, labels = load_digits_tensors()
    return images[:300], labels[:300]


def context(digits: tuple[Tensor, Tensor], seed: int = 0) -> GenerationContext:
    return GenerationContext(digits[0], digits[1], 10, torch.Generator().manual_seed(seed))


def pert(name: str, gap: float, severity: float = 3) -> Weakness:
    return Weakness(kind="perturbation", name=name, severity=severity, error_rate=min(gap + 0.1, 1), gap=gap,
                    support=100)


def confusion(i: int, j: int, rate: float) -> Weakness:
    return Weakness(kind="confusion", name=f"{i}->{j}", error_rate=rate, gap=rate, support=50, target=i, other=j)


def slice_(key: str, value: int, gap: float) -> Weakness:
    return Weakness(kind="slice", name=f"{key}={value}", error_rate=min(max(gap + 0.1, 0), 1), gap=gap, support=40,
                    target=value)


def profile(*weaknesses: Weakness, frontier: dict[str, float | None] | None = None) -> WeaknessProfile:
    return WeaknessProfile(weaknesses=weaknesses, frontier=frontier or {}, clean_error=0.1, num_samples=100)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"perturbations": "rotation"}, TypeError, "`perturbations` must be a list of names"),
        ({"perturbations": ["nope", "rotation"]}, ValueError, "`perturbations`.*unregistered"),
        ({"perturbations": ["rotation"]}, ValueError, "`perturbations` must name at least 2"),
        ({"top_k": 1}, ValueError, "`top_k` must be >= 2, got 1"),
        ({"top_k": 2.5}, TypeError, "`top_k` must be an int"),
        ({"curriculum_width": -0.5}, ValueError, "`curriculum_width` must be in"),
        ({"distractor_scale": 0.0}, ValueError, r"`distractor_scale` must be in \(0, 1\]"),
        ({"distractor_scale": 1.5}, ValueError, "`distractor_scale` must be in"),
        ({"distractor_alpha": 0.6}, ValueError, r"`distractor_alpha` must be in \(0, 0.5\]"),
        ({"distractor_alpha": "0.3"}, TypeError, "`distractor_alpha` must be a float"),
        ({"mix": "compound"}, TypeError, "`mix` must be a dict"),
        ({"mix": {"gan": 1.0}}, ValueError, r"`mix` keys must be among .*\['gan'\]"),
        ({"mix": {"compound": -1.0}}, ValueError, r"`mix\['compound'\]` must be in"),
        ({"mix": {"compound": 0.0, "slice": 0.0}}, ValueError, "`mix` must give at least one part"),
        ({"scenarios": [noop]}, TypeError, "`scenarios` must be a dict"),
        ({"scenarios": {"group=1": noop}}, ValueError, "`slice_key` must be a non-empty name"),
        ({"scenarios": {"": noop}}, ValueError, "`slice_key` must be a non-empty name"),
        ({"scenarios": {3: noop}}, TypeError, "`slice_key` must be a string"),
        ({"scenarios": {"group": 3}}, TypeError, "`fn` for slice 'group' must be callable"),
        ({"name": ""}, ValueError, "`name` must be a non-empty string"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ScenarioGenerator(**kwargs)


def test_bad_runtime_inputs_raise(digits: tuple[Tensor, Tensor]) -> None:
    gen = ScenarioGenerator(scenarios={"group": noop})
    with pytest.raises(ValueError, match="`slice_key` 'group' has a scenario already"):
        gen.register_scenario("group", noop)
    gen.register_scenario("group", noop, overwrite=True)
    with pytest.raises(ValueError, match="`budget` must be >= 0"):
        gen.generate(profile(), -1, context(digits))
    with pytest.raises(ValueError, match="names class 12, but the task has 10 classes"):
        gen.generate(profile(confusion(1, 12, 0.3)), 4, context(digits))
    with pytest.raises(ValueError, match="`images` and `distractors` must have one shape"):
        paste_distractor(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 4, 4), 0.5, 0.3)

    def short(value: int, n: int, context: GenerationContext) -> tuple[Tensor, Tensor]:
        return context.sample_real(n - 1)

    def wrong_type(value: int, n: int, context: GenerationContext) -> Tensor:
        return context.real_inputs[:n]

    gen.register_scenario("group", short, overwrite=True)
    with pytest.raises(ValueError, match=r"slice 'group' .*must return 5 images shaped"):
        gen.generate(profile(slice_("group", 1, 0.3)), 5, context(digits))
    gen.register_scenario("group", wrong_type, overwrite=True)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"slice 'group' .*must return a tuple"):
        gen.generate(profile(slice_("group", 1, 0.3)), 5, context(digits))


def full_profile() -> WeaknessProfile:
    return profile(pert("rotation", 0.3), pert("gaussian_noise", 0.2), pert("occlusion", 0.1),
                   confusion(3, 5, 0.2), confusion(8, 1, 0.1), slice_("group", 2, 0.3), slice_("group", 0, -0.1),
                   slice_("colour", 1, 0.5), frontier={"rotation": 2.0, "gaussian_noise": 3.0, "occlusion": None})


def test_outputs_have_shapes_range_labels_and_provenance(digits: tuple[Tensor, Tensor]) -> None:
    gen = ScenarioGenerator(scenarios={"group": noop})
    batch = gen.generate(full_profile(), 60, context(digits))
    assert len(batch) == 60 and batch.generator == "scenario"
    assert batch.inputs.shape == (60, 1, 8, 8) and batch.inputs.device.type == "cpu"
    assert float(batch.inputs.min()) >= 0.0 and float(batch.inputs.max()) <= 1.0
    assert batch.targets.dtype == torch.int64 and torch.equal(batch.quality, torch.ones(60))
    kinds = {k.split("/")[0] for k in batch.weakness}
    assert kinds == {"perturbation", "confusion", "slice"}
    # "colour" has no scenario function and "group=0" no positive gap: neither is produced.
    assert {k for k in batch.weakness if k.startswith("slice/")} == {"slice/group=2"}
    assert {k for k in batch.weakness if k.startswith("confusion/")} == {"confusion/3->5", "confusion/8->1"}
    # compounds and compositions report the real image they were made from; a scenario function's output none
    assert batch.source_index is not None
    from_scenario = torch.tensor([k.startswith("slice/") for k in batch.weakness])
    assert bool((batch.source_index[from_scenario] == -1).all())
    sources = batch.source_index[~from_scenario]
    assert bool((sources >= 0).all()) and torch.equal(batch.targets[~from_scenario], digits[1][sources])


@pytest.mark.parametrize("budget", [0, 1, 5, 31])
def test_budget_is_respected_exactly(digits: tuple[Tensor, Tensor], budget: int) -> None:
    gen = ScenarioGenerator(scenarios={"group": noop})
    assert sum(gen.plan(full_profile(), budget).values()) == budget
    assert len(gen.generate(full_profile(), budget, context(digits))) == budget


def test_plan_follows_gap_mass_and_mix() -> None:
    gen = ScenarioGenerator(scenarios={"group": noop})
    weights = gen.part_weights(full_profile())
    # Compound: mean gap per perturbation (0.3 + 0.2 + 0.1); confusion: 0.2 + 0.1; slice: group=2 only.
    assert weights == pytest.approx({"compound": 0.6, "confusion": 0.3, "slice": 0.3})
    assert gen.plan(full_profile(), 120) == {"compound": 60, "confusion": 30, "slice": 30}
    mixed = ScenarioGenerator(scenarios={"group": noop}, mix={"confusion": 1.0, "slice": 3.0})
    assert mixed.plan(full_profile(), 40) == {"compound": 0, "confusion": 10, "slice": 30}


def test_a_part_without_weaknesses_gives_its_budget_to_the_others() -> None:
    gen = ScenarioGenerator()  # no scenario functions: slice weaknesses cannot be answered
    assert gen.plan(profile(confusion(3, 5, 0.2), slice_("group", 1, 0.4)), 10) == {
        "compound": 0, "confusion": 10, "slice": 0}
    assert ScenarioGenerator(mix={"slice": 1.0, "confusion": 1.0}).plan(profile(confusion(3, 5, 0.2)), 8) == {
        "compound": 0, "confusion": 8, "slice": 0}
    # Nothing at all applies: everything goes to compound perturbations.
    assert gen.plan(profile(slice_("group", 1, 0.4)), 10) == {"compound": 10, "confusion": 0, "slice": 0}
    assert gen.plan(WeaknessProfile(), 7) == {"compound": 7, "confusion": 0, "slice": 0}


def test_compound_pairs_two_top_perturbations_near_their_frontiers(digits: tuple[Tensor, Tensor]) -> None:
    gen = ScenarioGenerator(top_k=2, curriculum_width=0.4)
    prof = profile(pert("gaussian_noise", 0.4), pert("rotation", 0.3), pert("scale", 0.05),
                   frontier={"rotation": 2.0, "gaussian_noise": 2.0})
    batch = gen.generate(prof, 30, context(digits))
    matches = [COMPOUND.match(k) for k in batch.weakness]
    assert all(matches)
    assert {(m["a"], m["b"]) for m in matches if m} == {("rotation", "gaussian_noise")}  # bank order
    assert {int(m["level"]) for m in matches if m} <= {2}
    # With one weak perturbation it is paired with the others; with none, pairs are uniform over the bank.
    single = gen.generate(profile(pert("occlusion", 0.3)), 40, context(digits))
    assert all("occlusion" in k for k in single.weakness)
    uniform = gen.generate(WeaknessProfile(), 40, context(digits))
    pairs = {tuple(m.group("a", "b")) for k in uniform.weakness if (m := COMPOUND.match(k))}
    assert len(pairs) > 10 and all(a != b for a, b in pairs)
    assert all(set(p) <= set(default_bank().names) for p in pairs)


def test_composition_keeps_label_i_and_adds_class_j_content() -> None:
    # Class 0 images are black, class 1 images white: any light pixel in the output comes from class 1.
    images = torch.cat([torch.zeros(10, 1, 16, 16), torch.ones(10, 1, 16, 16)])
    labels = torch.tensor([0] * 10 + [1] * 10)
    ctx = GenerationContext(images, labels, 2, torch.Generator().manual_seed(0))
    gen = ScenarioGenerator(distractor_scale=0.5, distractor_alpha=0.3)
    batch = gen.generate(profile(confusion(0, 1, 0.4)), 12, ctx)
    assert batch.targets.tolist() == [0] * 12 and batch.weakness == ["confusion/0->1"] * 12
    flat = batch.inputs.flatten(1)
    assert torch.allclose(flat.max(1).values, torch.full((12,), 0.3), atol=1e-5)  # bounded strength
    covered = (flat > 0.01).float().mean(1)
    assert bool(((covered > 0.15) & (covered < 0.4)).all())  # a quarter of the image: a shrunken j image
    positions = {tuple(torch.nonzero(x[0] > 0.01).min(0).values.tolist()) for x in batch.inputs}
    assert len(positions) > 3  # pasted at random positions


def test_composition_of_real_digits_stays_closest_to_class_i(digits: tuple[Tensor, Tensor]) -> None:
    gen = ScenarioGenerator(distractor_scale=1.0, distractor_alpha=0.3)
    batch = gen.generate(profile(confusion(0, 1, 0.4)), 20, context(digits))
    assert set(batch.targets.tolist()) == {0}
    means = torch.stack([digits[0][digits[1] == c].mean(0).flatten() for c in range(10)])
    nearest = torch.cdist(batch.inputs.flatten(1), means).argmin(1)
    assert float((nearest == 0).float().mean()) >= 0.8


def test_registered_scenario_is_called_with_the_weak_slice_value(digits: tuple[Tensor, Tensor]) -> None:
    calls: list[tuple[int, int]] = []

    def recolour(value: int, n: int, context: GenerationContext) -> tuple[Tensor, Tensor, Tensor]:
        calls.append((value, n))
        images, _ = context.sample_real(n)
        return images * 0.5, torch.full((n,), 7), torch.full((n,), 0.25)

    gen = ScenarioGenerator()
    gen.register_scenario("colour", recolour)
    prof = profile(slice_("colour", 4, 0.5), slice_("colour", 1, -0.2), slice_("group", 2, 0.6))
    batch = gen.generate(prof, 9, context(digits))
    assert calls == [(4, 9)]
    assert batch.weakness == ["slice/colour=4"] * 9 and batch.targets.tolist() == [7] * 9
    assert torch.equal(batch.quality, torch.full((9,), 0.25))
    assert "colour" in gen.scenarios


def test_same_seed_gives_the_same_batch(digits: tuple[Tensor, Tensor]) -> None:
    gen = ScenarioGenerator(scenarios={"group": noop})
    a = gen.generate(full_profile(), 25, context(digits, 3))
    b = gen.generate(full_profile(), 25, context(digits, 3))
    c = gen.generate(full_profile(), 25, context(digits, 4))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets) and a.weakness == b.weakness
    assert not torch.equal(a.inputs, c.inputs)
