"""Tests of `TargetedAugmentation` (lightning_synth/generators/targeted.py)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from torch import Tensor

from lightning_synth.datasets import load_digits_tensors
from lightning_synth.generators.base import GenerationContext
from lightning_synth.generators.targeted import (
    TargetedAugmentation,
    class_weights,
    frontier_severity,
    sample_severities,
)
from lightning_synth.perturbations import default_bank
from lightning_synth.profile import Weakness, WeaknessProfile

KEY = re.compile(r"^perturbation/(?P<name>[a-z_]+)@(?P<level>[1-5])$")


@pytest.fixture(scope="module")
def digits() -> tuple[Tensor, Tensor]:
    images, labels = load_digits_tensors()
    return images[:300], labels[:300]


def context(digits: tuple[Tensor, Tensor], seed: int = 0) -> GenerationContext:
    return GenerationContext(digits[0], digits[1], 10, torch.Generator().manual_seed(seed))


def pert(name: str, severity: float, gap: float) -> Weakness:
    return Weakness(kind="perturbation", name=name, severity=severity, error_rate=min(gap + 0.1, 1.0), gap=gap,
                    support=100)


def profile(gaps: dict[str, float], frontier: dict[str, float | None] | None = None, **kwargs: Any) -> WeaknessProfile:
    """One weakness per perturbation at severity 3 with the given gap."""
    weaknesses = [pert(name, 3, gap) for name, gap in gaps.items()] + list(kwargs.pop("extra", []))
    return WeaknessProfile(weaknesses=weaknesses, frontier=frontier or {}, clean_error=0.1, num_samples=100)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"perturbations": "rotation"}, TypeError, "`perturbations` must be a list of names"),
        ({"perturbations": 3}, TypeError, "`perturbations` must be a list of names"),
        ({"perturbations": ["nope"]}, ValueError, "`perturbations`.*unregistered"),
        ({"perturbations": []}, ValueError, "`perturbations` must name at least one"),
        ({"temperature": 0.0}, ValueError, r"`temperature` must be in \(0, inf\]"),
        ({"temperature": "1"}, TypeError, "`temperature` must be a float"),
        ({"temperature": float("inf")}, ValueError, "`temperature` must be in"),
        ({"min_share": -0.1}, ValueError, r"`min_share` must be in \[0, 0.111"),
        ({"min_share": 0.2}, ValueError, "`min_share` must be in"),
        ({"perturbations": ["rotation", "scale"], "min_share": 0.6}, ValueError, r"`min_share` must be in \[0, 0.5\]"),
        ({"curriculum_width": -1.0}, ValueError, "`curriculum_width` must be in"),
        ({"curriculum_width": None}, TypeError, "`curriculum_width` must be a float"),
        ({"class_bias": 1.5}, ValueError, r"`class_bias` must be in \[0, 1\]"),
        ({"class_bias": True}, TypeError, "`class_bias` must be a float"),
        ({"name": ""}, ValueError, "`name` must be a non-empty string"),
        ({"name": 3}, TypeError, "`name` must be a string"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        TargetedAugmentation(**kwargs)


def test_bad_generate_arguments_raise(digits: tuple[Tensor, Tensor]) -> None:
    gen, prof = TargetedAugmentation(uniform_floor=0.0), profile({"rotation": 0.3})
    with pytest.raises(ValueError, match="`budget` must be >= 0, got -1"):
        gen.generate(prof, -1, context(digits))
    with pytest.raises(TypeError, match="`budget` must be an int"):
        gen.generate(prof, 2.0, context(digits))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`profile` must be a WeaknessProfile"):
        gen.plan({"rotation": 0.3}, 4)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`context` must be a GenerationContext"):
        gen.generate(prof, 4, None)  # type: ignore[arg-type]


def test_output_shapes_range_labels_and_provenance(digits: tuple[Tensor, Tensor]) -> None:
    gen = TargetedAugmentation(name="aug")
    batch = gen.generate(profile({"rotation": 0.4, "gaussian_noise": 0.2}, {"rotation": 2.0}), 40, context(digits))
    assert len(batch) == 40 and batch.generator == "aug"
    assert batch.inputs.shape == (40, 1, 8, 8) and batch.inputs.dtype == torch.float32
    assert batch.inputs.device.type == "cpu"
    assert float(batch.inputs.min()) >= 0.0 and float(batch.inputs.max()) <= 1.0
    assert batch.targets.dtype == torch.int64 and set(batch.targets.tolist()) <= set(range(10))
    assert torch.equal(batch.quality, torch.ones(40))
    names = [KEY.match(k)["name"] for k in batch.weakness]  # type: ignore[index]
    assert set(names) <= set(default_bank().names)
    assert names.count("rotation") > names.count("gaussian_noise") > 0


@pytest.mark.parametrize("budget", [0, 1, 7, 33])
def test_budget_is_respected_exactly(digits: tuple[Tensor, Tensor], budget: int) -> None:
    gen = TargetedAugmentation(class_bias=0.5)
    prof = profile({"rotation": 0.4}, extra=[Weakness(kind="class", name="3", error_rate=0.4, gap=0.3, support=30,
                                                      target=3)])
    assert sum(gen.plan(prof, budget).values()) == budget
    batch = gen.generate(prof, budget, context(digits))
    assert len(batch) == budget and batch.inputs.shape[1:] == (1, 8, 8)


def test_plan_follows_the_profile() -> None:
    gen = TargetedAugmentation(min_share=0.02, uniform_floor=0.0)
    prof = profile({"rotation": 0.1, "gaussian_noise": 0.5, "occlusion": 0.2})
    plan = gen.plan(prof, 200, torch.Generator().manual_seed(0))
    assert sum(plan.values()) == 200 and set(plan) == set(default_bank().names)
    assert max(plan, key=plan.__getitem__) == "gaussian_noise"
    assert plan["gaussian_noise"] > plan["occlusion"] > plan["rotation"] > plan["scale"]
    assert min(plan.values()) >= 4  # the floor: 2% of 200, nothing dropped
    # A lower temperature concentrates the budget on the worst perturbation.
    sharp = TargetedAugmentation(temperature=0.3, min_share=0.0, uniform_floor=0.0).plan(prof, 200)
    assert sharp["gaussian_noise"] > plan["gaussian_noise"] and sharp["scale"] == 0


def test_plan_is_uniform_without_perturbation_weaknesses() -> None:
    gen = TargetedAugmentation()
    empty = gen.plan(WeaknessProfile(), 90)
    robust = gen.plan(profile({"rotation": -0.05, "scale": 0.0}), 90)
    assert set(empty.values()) == {10} and set(robust.values()) == {10}


def levels(batch_keys: list[str], name: str) -> list[int]:
    return [int(m["level"]) for k in batch_keys if (m := KEY.match(k)) and m["name"] == name]


def test_severities_concentrate_near_the_frontier_and_follow_it(digits: tuple[Tensor, Tensor]) -> None:
    gen = TargetedAugmentation(["rotation", "gaussian_noise"], curriculum_width=0.5, uniform_floor=0.0)
    gaps = {"rotation": 0.4, "gaussian_noise": 0.4}
    early = gen.generate(profile(gaps, {"rotation": 2.0, "gaussian_noise": 1.0}), 60, context(digits))
    later = gen.generate(profile(gaps, {"rotation": 4.0, "gaussian_noise": None}), 60, context(digits))
    assert set(levels(early.weakness, "rotation")) <= {2, 3} and set(levels(later.weakness, "rotation")) <= {4, 5}
    assert set(levels(early.weakness, "gaussian_noise")) <= {1}
    assert set(levels(later.weakness, "gaussian_noise")) <= {5}  # robust in the ladder: top of the ladder
    rotation = default_bank()["rotation"]
    sev = sample_severities(frontier_severity(profile(gaps, {"rotation": 2.0}), rotation), 0.5, 5, 500,
                            torch.Generator().manual_seed(0))
    assert float(sev.min()) >= 1.5 and float(sev.max()) <= 2.5 and abs(float(sev.mean()) - 2.0) < 0.05
    assert float(sample_severities(0.5, 1.0, 5, 100, torch.Generator()).min()) == 0.5  # clamped at 0.5


def test_frontier_fallbacks() -> None:
    rotation = default_bank()["rotation"]
    assert frontier_severity(WeaknessProfile(frontier={"rotation": None}), rotation) == 5.0
    assert frontier_severity(WeaknessProfile(frontier={"rotation": 9.0}), rotation) == 5.0
    assert frontier_severity(WeaknessProfile(weaknesses=[pert("rotation", 2, 0.3), pert("rotation", 4, 0.1)]),
                             rotation) == 2.0  # no frontier measured: the worst severity
    assert frontier_severity(WeaknessProfile(), rotation) == 5.0


def test_same_seed_gives_the_same_batch(digits: tuple[Tensor, Tensor]) -> None:
    gen = TargetedAugmentation(class_bias=0.3)
    prof = profile({"rotation": 0.3, "gaussian_noise": 0.2, "motion_blur": 0.1}, {"rotation": 2.5})
    a, b = gen.generate(prof, 24, context(digits, 5)), gen.generate(prof, 24, context(digits, 5))
    c = gen.generate(prof, 24, context(digits, 6))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets) and a.weakness == b.weakness
    assert not torch.equal(a.inputs, c.inputs)


def test_class_bias_draws_sources_from_weak_classes(digits: tuple[Tensor, Tensor]) -> None:
    weak = [Weakness(kind="class", name="3", error_rate=0.4, gap=0.3, support=30, target=3),
            Weakness(kind="confusion", name="8->1", error_rate=0.3, gap=0.3, support=30, target=8, other=1)]
    prof = profile({"rotation": 0.2}, extra=weak)
    assert class_weights(prof, 10).nonzero().flatten().tolist() == [3, 8]
    full = TargetedAugmentation(class_bias=1.0, uniform_floor=0.0).generate(prof, 40, context(digits))
    assert set(full.targets.tolist()) == {3, 8}
    none = TargetedAugmentation(class_bias=0.0, uniform_floor=0.0).generate(prof, 40, context(digits))
    assert len(set(none.targets.tolist())) > 4


def test_each_sample_reports_its_real_source(digits: tuple[Tensor, Tensor]) -> None:
    weak = [Weakness(kind="class", name="3", error_rate=0.4, gap=0.3, support=30, target=3)]
    gen = TargetedAugmentation(["brightness"], class_bias=0.5)
    batch = gen.generate(profile({"brightness": 0.3}, {"brightness": None}, extra=weak), 24, context(digits))
    assert batch.source_index is not None and batch.source_index.shape == (24,)
    assert torch.equal(batch.targets, digits[1][batch.source_index])
    # each output is nearer its own source than the other sources are on average (brightness shifts pixels)
    distances = torch.cdist(batch.inputs.flatten(1), digits[0][batch.source_index].flatten(1))
    assert bool((distances.diagonal() < distances.mean(1)).all())


def test_outputs_are_perturbed_real_images(digits: tuple[Tensor, Tensor]) -> None:
    # Brightness at the top level shifts every pixel: outputs differ from their sources but keep the shape.
    gen = TargetedAugmentation(["brightness"])
    batch = gen.generate(profile({"brightness": 0.3}, {"brightness": None}), 16, context(digits))
    distances = torch.cdist(batch.inputs.flatten(1), digits[0].flatten(1))
    assert float(distances.min(1).values.min()) > 0.1
    assert all(k.startswith("perturbation/brightness@") for k in batch.weakness)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_computes_on_the_device_and_returns_cpu(digits: tuple[Tensor, Tensor]) -> None:
    gen = TargetedAugmentation()
    prof = profile({"rotation": 0.3, "gaussian_blur": 0.2}, {"rotation": 2.0})
    cpu = gen.generate(prof, 32, context(digits))
    gpu_context = context(digits)
    gpu_context.device = torch.device("cuda")
    gpu = gen.generate(prof, 32, gpu_context)
    assert gpu.inputs.device.type == "cpu" and gpu.weakness == cpu.weakness
    assert torch.allclose(gpu.inputs, cpu.inputs, atol=1e-3)


def test_uniform_floor_keeps_every_perturbation_and_severity(digits: tuple[Tensor, Tensor]) -> None:
    # All weakness on gaussian_noise at severity 5: pure targeting puts (nearly) everything there, near the top.
    prof = WeaknessProfile(frontier=dict.fromkeys(default_bank().names, None) | {"gaussian_noise": 4.5},
                           weaknesses=[pert("gaussian_noise", 5, 0.6)])
    pure = TargetedAugmentation(min_share=0.0, uniform_floor=0.0).plan(prof, 180)
    assert pure["gaussian_noise"] == 180
    floored = TargetedAugmentation(min_share=0.0, uniform_floor=0.5)
    plan = floored.plan(prof, 180, torch.Generator().manual_seed(0))
    assert sum(plan.values()) == 180 and plan["gaussian_noise"] == 90 + 10
    assert all(plan[n] == 10 for n in default_bank().names if n != "gaussian_noise")
    assert floored.shares(prof)["rotation"] == pytest.approx(0.5 / 9)
    # The floor's severities span the ladder, where the targeted part sits at the frontier (4.5 +- 1).
    batch = floored.generate(prof, 180, context(digits))
    assert len(batch) == 180
    others = [lv for n in default_bank().names if n != "gaussian_noise" for lv in levels(batch.weakness, n)]
    assert len(others) == 80 and set(others) == {1, 2, 3, 4, 5}
    assert min(levels(batch.weakness, "gaussian_noise")) <= 2
    # uniform_floor=1 is the bank at random whatever the profile.
    assert set(TargetedAugmentation(uniform_floor=1.0).plan(prof, 90).values()) == {10}


def test_uniform_floor_is_validated() -> None:
    with pytest.raises(ValueError, match=r"`uniform_floor` must be in \[0, 1\], got 1.5"):
        TargetedAugmentation(uniform_floor=1.5)
