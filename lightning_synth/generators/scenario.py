"""`ScenarioGenerator`: new scenarios built from the weakness profile, not just single perturbations.

Three parts share the budget in proportion to the gap mass of the weaknesses they answer (or to fixed
``mix`` weights):

- ``"compound"``: two different perturbations among the worst ones, each near its failure frontier
  (weakness key ``perturbation/<a>+<b>@<level>``, ``a`` before ``b`` in bank order, ``level`` the rounded
  mean severity); mass: the sum of ``profile.perturbation_scores()``.
- ``"confusion"``: for a confusion weakness ``i->j``, a class-``i`` image with a shrunken class-``j``
  image blended in at a random position with bounded strength, so that ``i`` stays the visibly right
  label (label ``i``, key ``confusion/i->j``); mass: the positive confusion rates.
- ``"slice"``: user scenario functions keyed by slice attribute realise weak slice values (key
  ``slice/<attr>=<value>``); mass: the positive gaps of slices that have a registered function.

A part with nothing to answer gives its budget to the others; when no part applies, all of the budget
goes to compound perturbations drawn uniformly. All randomness comes from ``context.generator``, so every
rank makes the same samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import kornia
import torch
from torch import Tensor

from lightning_synth.generators.base import GenerationContext, SyntheticBatch, SyntheticGenerator
from lightning_synth.generators.targeted import (
    _allocate,
    _check_budget,
    _check_context,
    _check_float,
    _check_name,
    _check_profile,
    frontier_severity,
    sample_severities,
)
from lightning_synth.perturbations import PerturbationBank
from lightning_synth.profile import WeaknessProfile

__all__ = ["SCENARIO_PARTS", "ScenarioFn", "ScenarioGenerator", "paste_distractor"]

SCENARIO_PARTS: tuple[str, ...] = ("compound", "confusion", "slice")
ScenarioFn = Callable[[int, int, GenerationContext], tuple[Tensor, ...]]
"""``fn(value, n, context) -> (images (n, C, H, W), labels (n,)[, quality (n,)])``."""
_Part = tuple[Tensor, Tensor, list[str], Tensor, Tensor]  # inputs, labels, keys, quality, source rows (-1: none)


@dataclass(frozen=True)
class _Item:
    """One thing a part can make: its weakness key, weight, and what it needs (pair, classes, slice)."""

    key: str
    weight: float
    first: str = ""
    second: str = ""
    value: int = 0
    other: int = 0


class ScenarioGenerator(SyntheticGenerator):
    """Compound perturbations, compositions of confused classes and user scenarios for weak slices.

    Args:
        perturbations: registered perturbation names to combine; ``None`` means the default bank (>= 2).
        scenarios: scenario functions by slice attribute (see :meth:`register_scenario`).
        mix: fixed relative weights of the parts (``"compound"``, ``"confusion"``, ``"slice"``) used instead
            of their gap mass; a part left out gets none of the budget. ``None``: weights are gap mass.
        top_k: compound pairs are drawn among the ``top_k`` worst perturbations (>= 2).
        curriculum_width: half-width of the severity window around each frontier, in levels.
        distractor_scale: side of the pasted class-``j`` image relative to the image (1: whole image).
        distractor_alpha: blending strength of the distractor, at most 0.5 so that class ``i`` dominates.
        name: the generator's name in provenance and logs.

    Raises:
        TypeError: if an argument has the wrong type.
        ValueError: if an argument is out of range.

    Example:
        >>> from lightning_synth.profile import Weakness, WeaknessProfile
        >>> profile = WeaknessProfile(weaknesses=[
        ...     Weakness(kind="confusion", name="3->5", error_rate=0.3, gap=0.3, support=20, target=3, other=5),
        ...     Weakness(kind="slice", name="group=1", error_rate=0.4, gap=0.3, support=20, target=1)])
        >>> def recolour(value, n, context):
        ...     images, labels = context.sample_real(n)
        ...     return images * 0.5, labels
        >>> gen = ScenarioGenerator(scenarios={"group": recolour})
        >>> gen.plan(profile, 8)
        {'compound': 0, 'confusion': 4, 'slice': 4}
        >>> context = GenerationContext(torch.rand(32, 1, 8, 8), torch.arange(32) % 10, 10,
        ...                             torch.Generator().manual_seed(0))
        >>> batch = gen.generate(profile, 8, context)
        >>> batch.targets[:4].tolist(), batch.weakness[0], batch.weakness[-1]
        ([3, 3, 3, 3], 'confusion/3->5', 'slice/group=1')
    """

    name = "scenario"

    def __init__(
        self,
        perturbations: Sequence[str] | None = None,
        scenarios: Mapping[str, ScenarioFn] | None = None,
        mix: Mapping[str, float] | None = None,
        top_k: int = 3,
        curriculum_width: float = 0.5,
        distractor_scale: float = 0.5,
        distractor_alpha: float = 0.35,
        name: str = "scenario",
    ) -> None:
        if isinstance(perturbations, str) or not isinstance(perturbations, (Sequence, type(None))):
            raise TypeError(f"`perturbations` must be a list of names or None, got {perturbations!r}")
        try:
            self.bank = PerturbationBank(perturbations)
        except ValueError as err:
            raise ValueError(f"`perturbations`: {err}") from None
        if len(self.bank) < 2:
            raise ValueError(f"`perturbations` must name at least 2 perturbations to combine, got {self.bank.names}")
        if not isinstance(top_k, int) or isinstance(top_k, bool):
            raise TypeError(f"`top_k` must be an int, got {type(top_k).__name__}: {top_k!r}")
        if top_k < 2:
            raise ValueError(f"`top_k` must be >= 2, got {top_k}")
        _check_float("curriculum_width", curriculum_width, 0.0, math.inf)
        _check_float("distractor_scale", distractor_scale, 0.0, 1.0, low_open=True)
        _check_float("distractor_alpha", distractor_alpha, 0.0, 0.5, low_open=True)
        self.mix = _check_mix(mix)
        self.name = _check_name(name)
        self.top_k, self.curriculum_width = top_k, float(curriculum_width)
        self.distractor_scale, self.distractor_alpha = float(distractor_scale), float(distractor_alpha)
        if scenarios is not None and not isinstance(scenarios, Mapping):
            raise TypeError(f"`scenarios` must be a dict of slice key -> function, got {type(scenarios).__name__}")
        self._scenarios: dict[str, ScenarioFn] = {}
        for key, fn in (scenarios or {}).items():
            self.register_scenario(key, fn)

    @property
    def scenarios(self) -> dict[str, ScenarioFn]:
        """The registered scenario functions by slice attribute (a copy)."""
        return dict(self._scenarios)

    def register_scenario(self, slice_key: str, fn: ScenarioFn, overwrite: bool = False) -> None:
        """Make slice weaknesses ``slice/<slice_key>=<value>`` answerable by ``fn(value, n, context)``.

        ``fn`` returns ``n`` images ``(n, C, H, W)`` in [0, 1] shaped like ``context.real_inputs`` and their
        labels ``(n,)``, optionally with a quality ``(n,)`` in [0, 1], that realise slice value ``value``.

        Raises:
            TypeError: if ``slice_key`` is not a string or ``fn`` is not callable.
            ValueError: if ``slice_key`` is empty or has ``=`` or ``/``, or is taken and not ``overwrite``.
        """
        if not isinstance(slice_key, str):
            raise TypeError(f"`slice_key` must be a string, got {type(slice_key).__name__}: {slice_key!r}")
        if not slice_key or "=" in slice_key or "/" in slice_key:
            raise ValueError(f"`slice_key` must be a non-empty name without '=' or '/', got {slice_key!r}")
        if not callable(fn):
            raise TypeError(f"`fn` for slice {slice_key!r} must be callable, got {type(fn).__name__}")
        if slice_key in self._scenarios and not overwrite:
            raise ValueError(f"`slice_key` {slice_key!r} has a scenario already; pass `overwrite=True`")
        self._scenarios[slice_key] = fn

    def part_weights(self, profile: WeaknessProfile) -> dict[str, float]:
        """Relative weight of each part under ``profile`` (0 for a part with nothing to answer)."""
        _check_profile(profile)
        scores = profile.perturbation_scores()
        mass = {
            "compound": sum(max(score, 0.0) for name, score in scores.items() if name in self.bank),
            "confusion": sum(item.weight for item in _confusions(profile)),
            "slice": sum(item.weight for item in _slices(profile, set(self._scenarios))),
        }
        weights = {part: 0.0 if m <= 0 else m if self.mix is None else self.mix.get(part, 0.0)
                   for part, m in mass.items()}
        if sum(weights.values()) <= 0:
            weights["compound"] = 1.0
        return weights

    def plan(self, profile: WeaknessProfile, budget: int, generator: torch.Generator | None = None) -> dict[str, int]:
        """How many of ``budget`` samples each part makes (sums to ``budget``); :meth:`generate` calls this
        first with ``context.generator`` (``None``: the remainder goes to the largest fractions)."""
        _check_budget(budget)
        weights = self.part_weights(profile)
        counts = _allocate(torch.tensor(list(weights.values()), dtype=torch.float64), budget, generator)
        return dict(zip(weights, counts))

    def generate(self, profile: WeaknessProfile, budget: int, context: GenerationContext) -> SyntheticBatch:
        """``budget`` scenario samples aimed at ``profile`` (CPU tensors); see the module docstring."""
        _check_context(context)
        counts = self.plan(profile, budget, context.generator)
        if budget == 0:
            return SyntheticBatch.empty(self.name, context.real_inputs)
        items = self._items(profile)
        makers = {"compound": self._compound, "confusion": self._confusion, "slice": self._slice}
        parts = [makers[p](items[p], counts[p], context, profile) for p in SCENARIO_PARTS if counts[p] > 0]
        return SyntheticBatch(
            torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
            [key for p in parts for key in p[2]], torch.cat([p[3] for p in parts]), self.name,
            source_index=torch.cat([p[4] for p in parts]),
        )

    # ------------------------------------------------------------------------------------------ items
    def _items(self, profile: WeaknessProfile) -> dict[str, list[_Item]]:
        return {"compound": self._pairs(profile), "confusion": _confusions(profile),
                "slice": _slices(profile, set(self._scenarios))}

    def _pairs(self, profile: WeaknessProfile) -> list[_Item]:
        """Pairs among the ``top_k`` worst perturbations; with fewer than 2 weak ones, each weak one (or,
        with none, every one) is paired with every other perturbation of the bank."""
        measured = profile.perturbation_scores()
        scores = {n: max(measured.get(n, 0.0), 0.0) for n in self.bank.names}
        weak = sorted((n for n in self.bank.names if scores[n] > 0), key=lambda n: -scores[n])[: self.top_k]
        names = weak if len(weak) >= 2 else self.bank.names
        order = {n: i for i, n in enumerate(self.bank.names)}
        pairs = []
        for a_i, a in enumerate(names):
            for b in names[a_i + 1 :]:
                first, second = sorted((a, b), key=order.__getitem__)
                pairs.append(_Item(f"perturbation/{first}+{second}", scores[a] + scores[b], first, second))
        if sum(p.weight for p in pairs) <= 0:
            pairs = [_Item(p.key, 1.0, p.first, p.second) for p in pairs]
        return [p for p in pairs if p.weight > 0]

    # ------------------------------------------------------------------------------------------ makers
    def _compound(self, items: list[_Item], n: int, context: GenerationContext, profile: WeaknessProfile) -> _Part:
        rows = context.sample_rows(n)
        images, labels = context.real_rows(rows), context.real_targets[rows]
        counts = _allocate(torch.tensor([i.weight for i in items], dtype=torch.float64), n, context.generator)
        outputs: list[Tensor] = []
        keys: list[str] = []
        start = 0
        for item, count in zip(items, counts):
            if count == 0:
                continue
            chunk, total = images[start : start + count].to(context.device), torch.zeros(count)
            for pert_name in (item.first, item.second):
                perturbation = self.bank[pert_name]
                severity = sample_severities(frontier_severity(profile, perturbation), self.curriculum_width,
                                             perturbation.max_severity, count, context.generator)
                chunk, total = perturbation(chunk, severity, context.generator), total + severity
            outputs.append(chunk.cpu())
            keys.extend(f"{item.key}@{level}" for level in (total / 2 + 0.5).floor().long().clamp(min=1).tolist())
            start += count
        return torch.cat(outputs), labels.long(), keys, torch.ones(n), rows

    def _confusion(self, items: list[_Item], n: int, context: GenerationContext, profile: WeaknessProfile) -> _Part:
        del profile
        counts = _allocate(torch.tensor([i.weight for i in items], dtype=torch.float64), n, context.generator)
        rows: list[Tensor] = []
        distractors: list[Tensor] = []
        keys: list[str] = []
        for item, count in zip(items, counts):
            if count == 0:
                continue
            for cls in (item.value, item.other):
                if not 0 <= cls < context.num_classes:
                    raise ValueError(f"Weakness {item.key!r} names class {cls}, but the task has "
                                     f"{context.num_classes} classes (`context.num_classes`)")
            rows.append(context.sample_rows(count, torch.tensor([item.value])))
            distractors.append(context.sample_real(count, torch.tensor([item.other]))[0])
            keys.extend([item.key] * count)
        base = torch.cat(rows)
        images = paste_distractor(context.real_rows(base).to(context.device), torch.cat(distractors).to(context.device),
                                  self.distractor_scale, self.distractor_alpha, context.generator)
        return images.cpu(), context.real_targets[base].long(), keys, torch.ones(n), base

    def _slice(self, items: list[_Item], n: int, context: GenerationContext, profile: WeaknessProfile) -> _Part:
        del profile
        counts = _allocate(torch.tensor([i.weight for i in items], dtype=torch.float64), n, context.generator)
        images: list[Tensor] = []
        labels: list[Tensor] = []
        quality: list[Tensor] = []
        keys: list[str] = []
        for item, count in zip(items, counts):
            if count == 0:
                continue
            slice_key = item.first
            out = self._scenarios[slice_key](item.value, count, context)
            x, y, q = _check_scenario_output(out, slice_key, item.value, count, context.real_inputs)
            images.append(x)
            labels.append(y)
            quality.append(q)
            keys.extend([item.key] * count)
        return torch.cat(images), torch.cat(labels), keys, torch.cat(quality), torch.full((n,), -1)


# ------------------------------------------------------------------------------------------- pure helpers
def paste_distractor(
    images: Tensor, distractors: Tensor, scale: float, alpha: float, generator: torch.Generator | None = None
) -> Tensor:
    """Blend each distractor, shrunk to ``scale`` of the image side, into its image at a random position.

    Inside the pasted square the result is ``(1 - alpha) * image + alpha * distractor``; elsewhere the
    image is unchanged. With ``alpha <= 0.5`` the image's own content stays dominant.

    Shape:
        - images, distractors: ``(B, C, H, W)`` float in [0, 1] on one device; output likewise.

    Example:
        >>> out = paste_distractor(torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8), scale=0.5, alpha=0.4,
        ...                        generator=torch.Generator().manual_seed(0))
        >>> round(out.max().item(), 2), bool((out == 0).float().mean() > 0.5)
        (0.4, True)
    """
    if images.shape != distractors.shape:
        raise ValueError(f"`images` and `distractors` must have one shape, got {tuple(images.shape)} "
                         f"and {tuple(distractors.shape)}")
    n, _, h, w = images.shape
    # Offsets of the pasted square's corner, drawn on the CPU so every device gives the same placement.
    offset = torch.rand(n, 2, generator=generator) * torch.tensor([w - 1.0, h - 1.0]) * (1.0 - scale)
    matrix = torch.zeros(n, 2, 3)
    matrix[:, 0, 0] = matrix[:, 1, 1] = scale
    matrix[:, :, 2] = offset
    matrix = matrix.to(device=images.device, dtype=images.dtype)
    warped = kornia.geometry.transform.warp_affine(distractors, matrix, dsize=(h, w), align_corners=True)
    mask = kornia.geometry.transform.warp_affine(
        torch.ones_like(distractors[:, :1]), matrix, dsize=(h, w), align_corners=True
    )
    return (images + alpha * mask * (warped - images)).clamp(0.0, 1.0)


def _confusions(profile: WeaknessProfile) -> list[_Item]:
    """Confusion weaknesses with a positive rate and known classes (``target``/``other``, or ``"i->j"``)."""
    items = []
    for w in profile.by_kind("confusion"):
        true, predicted = w.target, w.other
        if true is None or predicted is None:
            parts = w.name.split("->")
            if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
                continue
            true, predicted = int(parts[0]), int(parts[1])
        if w.gap > 0 and true != predicted:
            items.append(_Item(w.key, w.gap, value=true, other=predicted))
    return items


def _slices(profile: WeaknessProfile, registered: set[str]) -> list[_Item]:
    """Slice weaknesses ``<attr>=<value>`` with a positive gap whose attribute has a scenario function."""
    items = []
    for w in profile.by_kind("slice"):
        attr, sep, raw = w.name.rpartition("=")
        if not sep or attr not in registered or w.gap <= 0:
            continue
        if w.target is not None:
            value = w.target
        elif raw.strip().lstrip("-").isdigit():
            value = int(raw)
        else:
            continue
        items.append(_Item(w.key, w.gap, first=attr, value=value))
    return items


def _check_mix(mix: object) -> dict[str, float] | None:
    if mix is None:
        return None
    if not isinstance(mix, Mapping):
        raise TypeError(f"`mix` must be a dict of part -> weight or None, got {type(mix).__name__}")
    unknown = sorted(set(mix) - set(SCENARIO_PARTS))
    if unknown:
        raise ValueError(f"`mix` keys must be among {SCENARIO_PARTS}, got {unknown}")
    for part, weight in mix.items():
        _check_float(f"mix[{part!r}]", weight, 0.0, math.inf)
    if sum(mix.values()) <= 0:
        raise ValueError(f"`mix` must give at least one part a positive weight, got {dict(mix)}")
    return {part: float(mix[part]) for part in SCENARIO_PARTS if part in mix}


def _check_scenario_output(
    out: object, slice_key: str, value: int, n: int, like: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate a scenario function's return and bring it to CPU: images, int64 labels, quality."""
    where = f"The scenario function for slice {slice_key!r} (value {value}, n={n})"
    if not isinstance(out, tuple) or len(out) not in (2, 3) or not all(isinstance(t, Tensor) for t in out):
        raise TypeError(f"{where} must return a tuple (images, labels) or (images, labels, quality) of "
                        f"tensors, got {type(out).__name__}")
    images, labels = out[0].detach().float().cpu(), out[1].detach().long().cpu().reshape(-1)
    quality = out[2].detach().float().cpu().reshape(-1).clamp(0, 1) if len(out) == 3 else torch.ones(n)
    if tuple(images.shape) != (n, *like.shape[1:]) or len(labels) != n or len(quality) != n:
        raise ValueError(f"{where} must return {n} images shaped {tuple(like.shape[1:])} with {n} labels "
                         f"(and qualities); got images {tuple(images.shape)}, labels {len(labels)}, "
                         f"quality {len(quality)}")
    return images.clamp(0.0, 1.0), labels, quality
