"""`TargetedAugmentation`: real images perturbed where, and as hard as, the weakness profile says the model fails.

Each sample takes a real image and one perturbation of the shared bank (the same bank the analyzer probes
with). Perturbations are drawn in proportion to their weakness (``profile.perturbation_scores()`` raised to
``1 / temperature``), each keeps at least ``min_share`` of the budget, and the draw is uniform when the
profile shows no perturbation weakness. Severities are drawn around each perturbation's failure frontier,
``frontier + U(-curriculum_width, +curriculum_width)`` clamped to ``[0.5, max severity]``: as the model
becomes robust the frontier moves up the ladder and the samples follow it (a curriculum). That is the
targeted part; ``uniform_floor`` of the budget (80% by default) is drawn with no targeting at all: the
perturbations split evenly, severities uniform over the ladder. All randomness comes from
``context.generator``, so every rank makes the same samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_synth.generators.base import GenerationContext, SyntheticBatch, SyntheticGenerator
from lightning_synth.perturbations import Perturbation, PerturbationBank
from lightning_synth.profile import WeaknessProfile

__all__ = ["TargetedAugmentation", "class_weights", "frontier_severity", "sample_severities", "severity_levels"]

_MIN_SEVERITY = 0.5


class TargetedAugmentation(SyntheticGenerator):
    """Perturb real images with the bank's perturbations, weighted by weakness, at the failure frontier.

    Args:
        perturbations: names of registered perturbations to draw from; ``None`` means the default bank.
        temperature: shares are proportional to ``score ** (1 / temperature)``: below 1 sharpens towards the
            worst perturbation, above 1 flattens towards uniform.
        min_share: the least share of the budget every perturbation keeps, so none is dropped entirely
            (at most ``1 / len(perturbations)``).
        curriculum_width: half-width of the severity window around the frontier, in severity levels.
        class_bias: fraction of the source images drawn from weak classes (class and confusion weaknesses,
            by gap) instead of uniformly; 0 (the default) disables it, and it has no effect when the profile
            has none.
        uniform_floor: fraction of the budget drawn with no targeting at all: perturbations split evenly and
            severities uniform over ``[0.5, max severity]`` (diversity kept under the tilt; 1 is the bank at
            random, 0 pure targeting). The defaults (0.8 here, ``class_bias=0``) were chosen on the robustness
            benchmark's validation corruptions, where stronger targeting lost accuracy to the bank at random.
        name: the generator's name in provenance and logs.

    Raises:
        TypeError: if an argument has the wrong type.
        ValueError: if an argument is out of range or names an unregistered perturbation.

    Example:
        >>> from lightning_synth.profile import Weakness, WeaknessProfile
        >>> profile = WeaknessProfile(frontier={"rotation": 2.0, "gaussian_noise": None}, weaknesses=[
        ...     Weakness(kind="perturbation", name="rotation", severity=3, error_rate=0.6, gap=0.5, support=64)])
        >>> gen = TargetedAugmentation(["rotation", "gaussian_noise"], min_share=0.1)
        >>> context = GenerationContext(torch.rand(32, 1, 8, 8), torch.arange(32) % 10, 10,
        ...                             torch.Generator().manual_seed(0))
        >>> gen.plan(profile, 10)
        {'rotation': 6, 'gaussian_noise': 4}
        >>> batch = gen.generate(profile, 10, context)
        >>> len(batch), tuple(batch.inputs.shape[1:]), batch.weakness[-1]
        (10, (1, 8, 8), 'perturbation/gaussian_noise@4')
    """

    name = "targeted"

    def __init__(
        self,
        perturbations: Sequence[str] | None = None,
        temperature: float = 1.0,
        min_share: float = 0.02,
        curriculum_width: float = 1.0,
        class_bias: float = 0.0,
        uniform_floor: float = 0.8,
        name: str = "targeted",
    ) -> None:
        if perturbations is not None and not isinstance(perturbations, Sequence):
            raise TypeError(f"`perturbations` must be a list of names or None, got {type(perturbations).__name__}")
        if isinstance(perturbations, str):
            raise TypeError(f"`perturbations` must be a list of names, not a string: {perturbations!r}")
        try:
            self.bank = PerturbationBank(perturbations)
        except ValueError as err:
            raise ValueError(f"`perturbations`: {err}") from None
        if len(self.bank) == 0:
            raise ValueError("`perturbations` must name at least one perturbation, got []")
        _check_float("temperature", temperature, 0.0, math.inf, low_open=True)
        _check_float("min_share", min_share, 0.0, 1.0 / len(self.bank))
        _check_float("curriculum_width", curriculum_width, 0.0, math.inf)
        _check_float("class_bias", class_bias, 0.0, 1.0)
        _check_float("uniform_floor", uniform_floor, 0.0, 1.0)
        self.name = _check_name(name)
        self.uniform_floor = float(uniform_floor)
        self.temperature, self.min_share = float(temperature), float(min_share)
        self.curriculum_width, self.class_bias = float(curriculum_width), float(class_bias)

    def shares(self, profile: WeaknessProfile) -> dict[str, float]:
        """Per perturbation of the bank, its expected share of the budget under ``profile`` (sums to 1)."""
        _check_profile(profile)
        share = self.uniform_floor / len(self.bank) + (1.0 - self.uniform_floor) * self._tilted_shares(profile)
        return dict(zip(self.bank.names, (share / share.sum()).tolist()))

    def _tilted_shares(self, profile: WeaknessProfile) -> Tensor:
        """The targeted part's shares (no uniform floor): tempered weakness scores with ``min_share`` each."""
        scores = profile.perturbation_scores()
        raw = torch.tensor([scores.get(n, 0.0) for n in self.bank.names], dtype=torch.float64).clamp(min=0)
        k = len(raw)
        if float(raw.sum()) <= 0:
            return torch.full((k,), 1.0 / k, dtype=torch.float64)
        tempered = raw.pow(1.0 / self.temperature)
        tempered = tempered / tempered.sum()
        share = self.min_share + (1.0 - k * self.min_share) * tempered
        return share / share.sum()

    def _split(self, profile: WeaknessProfile, budget: int, generator: torch.Generator | None
               ) -> tuple[list[int], list[int]]:
        """Per perturbation, how many targeted and how many uniform-floor samples of ``budget``."""
        _check_budget(budget)
        floor = round(self.uniform_floor * budget)
        _check_profile(profile)
        targeted = _allocate(self._tilted_shares(profile), budget - floor, generator)
        uniform = _allocate(torch.ones(len(self.bank), dtype=torch.float64), floor, generator)
        return targeted, uniform

    def plan(self, profile: WeaknessProfile, budget: int, generator: torch.Generator | None = None) -> dict[str, int]:
        """How many of ``budget`` samples each perturbation gets (sums to ``budget``).

        The integer parts of ``share * budget`` are fixed; the remainder goes to perturbations drawn in
        proportion to their fractional parts with ``generator`` (largest fractions first when ``None``).
        :meth:`generate` calls this first with ``context.generator``.
        """
        targeted, uniform = self._split(profile, budget, generator)
        return {name: t + u for name, t, u in zip(self.bank.names, targeted, uniform)}

    def centres(self, profile: WeaknessProfile) -> dict[str, float]:
        """Per perturbation, the severity the samples are centred on (see :func:`frontier_severity`)."""
        _check_profile(profile)
        return {p.name: frontier_severity(profile, p) for p in self.bank}

    def generate(self, profile: WeaknessProfile, budget: int, context: GenerationContext) -> SyntheticBatch:
        """``budget`` perturbed real images aimed at ``profile`` (CPU tensors); see the module docstring."""
        _check_context(context)
        targeted, uniform = self._split(profile, budget, context.generator)
        if budget == 0:
            return SyntheticBatch.empty(self.name, context.real_rows(torch.zeros(0, dtype=torch.long)))
        rows = self._sources(profile, budget, context)
        images, labels = context.real_rows(rows), context.real_targets[rows].long()
        outputs: list[Tensor] = []
        keys: list[str] = []
        start = 0
        for perturbation, n_targeted, n_uniform in zip(self.bank, targeted, uniform):
            count = n_targeted + n_uniform
            if count == 0:
                continue
            top = float(perturbation.max_severity)
            severity = torch.cat([
                sample_severities(frontier_severity(profile, perturbation), self.curriculum_width, top,
                                  n_targeted, context.generator),
                _MIN_SEVERITY + torch.rand(n_uniform, generator=context.generator) * (top - _MIN_SEVERITY),
            ])
            chunk = images[start : start + count].to(context.device)
            outputs.append(perturbation(chunk, severity, context.generator).cpu())
            levels = severity_levels(severity, perturbation)
            keys.extend(f"perturbation/{perturbation.name}@{level}" for level in levels)
            start += count
        return SyntheticBatch(torch.cat(outputs), labels, keys, torch.ones(budget), self.name, source_index=rows)

    def _sources(self, profile: WeaknessProfile, budget: int, context: GenerationContext) -> Tensor:
        """Rows of real images: ``class_bias`` of them from weak classes by gap, the rest uniform, shuffled."""
        weights = class_weights(profile, context.num_classes)
        biased = round(self.class_bias * budget) if float(weights.sum()) > 0 else 0
        parts = [context.sample_rows(budget - biased)]
        if biased:
            classes = torch.multinomial(weights, biased, replacement=True, generator=context.generator)
            counts = torch.bincount(classes, minlength=context.num_classes)
            parts += [context.sample_rows(int(n), torch.tensor([c])) for c, n in enumerate(counts.tolist()) if n]
        return torch.cat(parts)[torch.randperm(budget, generator=context.generator)]


# ------------------------------------------------------------------------------------------- pure helpers
def frontier_severity(profile: WeaknessProfile, perturbation: Perturbation) -> float:
    """The severity to centre samples of ``perturbation`` on.

    ``profile.frontier[name]`` when measured; the top of the ladder when the frontier is ``None`` (robust
    within the ladder); when the profile has no frontier for it (a hand-built profile), the severity of its
    largest-gap weakness, or the top of the ladder. Clamped to ``[0.5, max severity]``.

    Example:
        >>> from lightning_synth.perturbations import default_bank
        >>> frontier_severity(WeaknessProfile(frontier={"rotation": 2.5}), default_bank()["rotation"])
        2.5
        >>> frontier_severity(WeaknessProfile(frontier={"rotation": None}), default_bank()["rotation"])
        5.0
    """
    top = float(perturbation.max_severity)
    if perturbation.name in profile.frontier:
        value = profile.frontier[perturbation.name]
        centre = top if value is None else float(value)
    else:
        hurt = [w for w in profile.by_kind("perturbation")
                if w.name == perturbation.name and w.severity is not None and w.gap > 0]
        centre = float(hurt[0].severity) if hurt and hurt[0].severity is not None else top
    return min(max(centre, _MIN_SEVERITY), top)


def sample_severities(centre: float, width: float, max_severity: float, n: int, generator: torch.Generator) -> Tensor:
    """``n`` severities ``centre + U(-width, width)`` clamped to ``[0.5, max_severity]`` (CPU, float32)."""
    offsets = (torch.rand(n, generator=generator) * 2.0 - 1.0) * width
    return (centre + offsets).clamp(_MIN_SEVERITY, float(max_severity))


def severity_levels(severity: Tensor, perturbation: Perturbation) -> list[int]:
    """Severities rounded (half up) to the integer levels ``1..max_severity`` used in weakness keys."""
    return (severity + 0.5).floor().clamp(1, perturbation.max_severity).long().tolist()


def class_weights(profile: WeaknessProfile, num_classes: int) -> Tensor:
    """Per class, the largest positive gap among class and confusion weaknesses about it (``(num_classes,)``)."""
    weights = torch.zeros(num_classes, dtype=torch.float64)
    for w in profile.by_kind(("class", "confusion")):
        if w.target is not None and 0 <= w.target < num_classes and w.gap > 0:
            weights[w.target] = max(float(weights[w.target]), w.gap)
    return weights


def _allocate(weights: Tensor, total: int, generator: torch.Generator | None) -> list[int]:
    """Split ``total`` into integer counts proportional to ``weights`` (uniform when they are all 0)."""
    if len(weights) == 0:
        return []
    p = weights.double().clamp(min=0)
    p = p / p.sum() if float(p.sum()) > 0 else torch.full_like(p, 1.0 / len(p))
    exact = p * total
    counts = exact.floor().long()
    rest = total - int(counts.sum())
    if rest > 0:
        frac = (exact - counts).clamp(min=0)
        if generator is None or int((frac > 0).sum()) < rest:
            extra = torch.argsort(frac, descending=True, stable=True)[:rest]
        else:
            extra = torch.multinomial(frac, rest, replacement=False, generator=generator)
        counts[extra] += 1
    return counts.tolist()


# ------------------------------------------------------------------------------------------- validation
def _check_float(name: str, value: object, low: float, high: float, low_open: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"`{name}` must be a float, got {type(value).__name__}: {value!r}")
    below = value <= low if low_open else value < low
    if below or value > high or not math.isfinite(value):
        left = "(" if low_open else "["
        raise ValueError(f"`{name}` must be in {left}{low:g}, {high:g}], got {value}")


def _check_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"`name` must be a string, got {type(name).__name__}: {name!r}")
    if not name.strip():
        raise ValueError(f"`name` must be a non-empty string, got {name!r}")
    return name


def _check_budget(budget: object) -> None:
    if not isinstance(budget, int) or isinstance(budget, bool):
        raise TypeError(f"`budget` must be an int, got {type(budget).__name__}: {budget!r}")
    if budget < 0:
        raise ValueError(f"`budget` must be >= 0, got {budget}")


def _check_profile(profile: object) -> None:
    if not isinstance(profile, WeaknessProfile):
        raise TypeError(f"`profile` must be a WeaknessProfile, got {type(profile).__name__}")


def _check_context(context: object) -> None:
    if not isinstance(context, GenerationContext):
        raise TypeError(f"`context` must be a GenerationContext, got {type(context).__name__}")
    if len(context.real_targets) == 0:
        raise ValueError("`context.real_inputs` is empty; generators need real samples to transform")
