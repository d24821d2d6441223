"""The analyzer's metrics and math: torchmetrics states that sync across ranks, and pure functions that
turn their values into a :class:`~lightning_synth.profile.WeaknessProfile`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_synth.profile import Weakness, WeaknessProfile

__all__ = ["GroupAccuracy", "ProbeAccuracy", "build_profile", "failure_frontier", "paired_gap_interval"]


class ProbeAccuracy(Metric):
    """Correct/total counts per (perturbation, severity) cell; column 0 is the clean probe subset.

    Summed across processes on ``compute()``, so every rank gets the global counts.

    Example:
        >>> m = ProbeAccuracy(num_perturbations=2, num_severities=3)
        >>> m.update(0, 1, torch.tensor([True, False]))
        >>> m.compute()[0][0, 1].item(), m.compute()[1][0, 1].item()
        (1.0, 2.0)
    """

    full_state_update = False
    correct: Tensor
    total: Tensor
    clean_correct: Tensor
    discordant: Tensor

    def __init__(self, num_perturbations: int, num_severities: int) -> None:
        super().__init__()
        shape = (max(num_perturbations, 1), num_severities + 1)
        self.add_state("correct", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        # On the same samples: clean hits, and how many samples the perturbation flipped either way (for a
        # paired confidence interval of the gap).
        self.add_state("clean_correct", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("discordant", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self, perturbation: int | slice, severity: int | slice, hits: Tensor, clean_hits: Tensor | None = None
    ) -> None:
        """Add the boolean ``hits`` (``(N,)``) of one cell, or ``(S, N)`` for a row of severities, and the
        clean hits ``(N,)`` of the same samples (default: ``hits``, for the clean column)."""
        hits = hits.to(torch.float64)
        clean = hits if clean_hits is None else clean_hits.to(torch.float64).expand_as(hits)
        self.correct[perturbation, severity] += hits.sum(-1)
        self.total[perturbation, severity] += hits.shape[-1]
        self.clean_correct[perturbation, severity] += clean.sum(-1)
        self.discordant[perturbation, severity] += (hits != clean).to(torch.float64).sum(-1)

    def counts(self) -> Tensor:
        """The local states stacked as ``(4, P, S + 1)``: correct, total, clean_correct, discordant."""
        return torch.stack([self.correct, self.total, self.clean_correct, self.discordant])

    def compute(self) -> tuple[Tensor, Tensor]:
        return self.correct, self.total


class GroupAccuracy(Metric):
    """Correct/total counts per integer group value in ``[0, max_groups)`` for one slice attribute."""

    full_state_update = False
    correct: Tensor
    total: Tensor

    def __init__(self, max_groups: int) -> None:
        super().__init__()
        self.max_groups = max_groups
        self.add_state("correct", torch.zeros(max_groups, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(max_groups, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, groups: Tensor, hits: Tensor) -> None:
        groups = groups.reshape(-1).long()
        if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= self.max_groups):
            raise ValueError(
                f"Slice values must be integers in [0, {self.max_groups}); got values in "
                f"[{int(groups.min())}, {int(groups.max())}]. Map them to small integers in `slice_fn`, "
                "or raise `max_groups`."
            )
        self.correct.index_add_(0, groups, hits.reshape(-1).to(torch.float64))
        self.total.index_add_(0, groups, torch.ones_like(groups, dtype=torch.float64))

    def compute(self) -> tuple[Tensor, Tensor]:
        return self.correct, self.total


def failure_frontier(gaps: Sequence[float], severities: Sequence[float], threshold: float) -> float | None:
    """The severity where the accuracy gap first reaches ``threshold`` (linear between levels, gap 0 at
    severity 0); ``None`` when it never does.

    Example:
        >>> failure_frontier([0.0, 0.1, 0.3], [1, 2, 3], threshold=0.2)
        2.5
    """
    prev_sev, prev_gap = 0.0, 0.0
    for sev, gap in zip(severities, gaps):
        if gap >= threshold:  # here prev_gap < threshold <= gap, so the slope is positive
            return float(prev_sev + (threshold - prev_gap) / (gap - prev_gap) * (sev - prev_sev))
        prev_sev, prev_gap = float(sev), float(gap)
    return None


def _class_and_confusion(
    confusion: Tensor, clean_error: float, class_names: Sequence[str], top_k: int, min_support: int
) -> list[Weakness]:
    out: list[Weakness] = []
    rows = confusion.sum(1)
    for c in range(confusion.shape[0]):
        support = int(rows[c])
        if support < min_support:
            continue
        error = 1.0 - float(confusion[c, c]) / support
        out.append(Weakness(kind="class", name=class_names[c], error_rate=error, gap=error - clean_error,
                            support=support, target=c))
    rates = confusion / rows.clamp(min=1)[:, None]
    rates.fill_diagonal_(0)
    rates[rows < min_support] = 0
    values, flat = rates.flatten().topk(min(top_k, rates.numel()))
    for value, index in zip(values.tolist(), flat.tolist()):
        if value <= 0:
            break
        i, j = divmod(index, confusion.shape[1])
        out.append(Weakness(kind="confusion", name=f"{class_names[i]}->{class_names[j]}", error_rate=value,
                            gap=value, support=int(rows[i]), target=i, other=j))
    return out


def paired_gap_interval(counts: Tensor, z: float = 2.576) -> tuple[Tensor, Tensor, Tensor]:
    """Per cell, the accuracy gap (clean minus perturbed, on the same samples) and its confidence bounds.

    ``counts`` is ``(4, ...)``: correct, total, clean_correct, discordant (see :meth:`ProbeAccuracy.counts`).
    The variance of the per-sample difference is estimated with one pseudo-discordance (so a cell with no
    flips after a few samples still has a nonzero width). Returns ``(gap, low, high)``.

    Example:
        >>> counts = torch.tensor([[20.0], [100.0], [80.0], [60.0]])  # 60 flips, net 60 more errors
        >>> gap, low, high = paired_gap_interval(counts)
        >>> round(gap.item(), 2), bool(low.item() > 0.4), bool(high.item() < 0.8)
        (0.6, True, True)
    """
    correct, total, clean, discordant = counts.double()
    n = total.clamp(min=1)
    gap = (clean - correct) / n
    var = ((discordant + 1) / (n + 2) - gap**2).clamp(min=0)
    half = z * (var / n).sqrt()
    return gap, gap - half, gap + half


def _perturbations(
    probe_correct: Tensor, probe_total: Tensor, names: Sequence[str], severities: Sequence[int],
    threshold: float, probe_clean_correct: Tensor | None = None,
) -> tuple[list[Weakness], dict[str, float | None]]:
    out: list[Weakness] = []
    frontier: dict[str, float | None] = {}
    error = 1.0 - probe_correct / probe_total.clamp(min=1)
    for p, name in enumerate(names):
        base = float(error[p, 0])
        gaps = []
        for s, sev in enumerate(severities, start=1):
            support = int(probe_total[p, s])
            if support == 0:
                continue
            if probe_clean_correct is not None:  # paired: the clean error of the very samples of this cell
                gap = float(error[p, s]) - (1.0 - float(probe_clean_correct[p, s]) / support)
            else:
                gap = float(error[p, s]) - base
            gaps.append(gap)
            out.append(Weakness(kind="perturbation", name=name, severity=float(sev), error_rate=float(error[p, s]),
                                gap=max(min(gap, 1.0), -1.0), support=support))
        frontier[name] = failure_frontier(gaps, severities[: len(gaps)], threshold) if gaps else None
    return out, frontier


def _slices(
    slice_counts: dict[str, tuple[Tensor, Tensor]], clean_error: float, min_support: int
) -> list[Weakness]:
    out: list[Weakness] = []
    for key, (correct, total) in sorted(slice_counts.items()):
        for value in torch.nonzero(total >= max(min_support, 1)).flatten().tolist():
            error = 1.0 - float(correct[value]) / float(total[value])
            out.append(Weakness(kind="slice", name=f"{key}={value}", error_rate=error, gap=error - clean_error,
                                support=int(total[value]), target=value))
    return out


def build_profile(
    confusion: Tensor,
    probe_correct: Tensor,
    probe_total: Tensor,
    perturbation_names: Sequence[str],
    severities: Sequence[int],
    slice_counts: dict[str, tuple[Tensor, Tensor]] | None = None,
    class_names: Sequence[str] | None = None,
    threshold: float = 0.1,
    top_k_confusions: int = 5,
    min_support: int = 1,
    epoch: int = -1,
    probe_clean_correct: Tensor | None = None,
) -> WeaknessProfile:
    """Turn synced metric values into a ranked :class:`WeaknessProfile` (pure; same input, same output).

    Args:
        confusion: ``(C, C)`` counts, rows are true classes.
        probe_correct: ``(P, S + 1)`` correct counts; column 0 is the clean probe subset.
        probe_total: ``(P, S + 1)`` totals.
        perturbation_names: the ``P`` perturbation names.
        severities: the ``S`` severity levels probed.
        slice_counts: per slice attribute, ``(correct, total)`` per group value.
        class_names: names of the ``C`` classes (default: their indices).
        threshold: accuracy gap that defines the failure frontier.
        top_k_confusions: how many confused pairs to report.
        min_support: classes/groups with fewer samples are left out.
        epoch: recorded in the profile.
        probe_clean_correct: ``(P, S + 1)`` clean hits on the samples of each cell; when given, each cell's
            gap is paired (its own samples' clean error), so cells probed on fewer samples stay unbiased.
    """
    confusion = confusion.detach().double().cpu()
    total = float(confusion.sum())
    clean_error = 1.0 - float(confusion.trace()) / total if total else 0.0
    names = list(class_names) if class_names is not None else [str(c) for c in range(confusion.shape[0])]
    weaknesses = _class_and_confusion(confusion, clean_error, names, top_k_confusions, min_support)
    paired = None if probe_clean_correct is None else probe_clean_correct.double().cpu()
    probes, frontier = _perturbations(probe_correct.double().cpu(), probe_total.double().cpu(),
                                      perturbation_names, severities, threshold, paired)
    weaknesses += probes
    counts = {k: (c.double().cpu(), t.double().cpu()) for k, (c, t) in (slice_counts or {}).items()}
    weaknesses += _slices(counts, clean_error, min_support)
    return WeaknessProfile(weaknesses=tuple(weaknesses), clean_error=clean_error, num_samples=int(total),
                           epoch=epoch, frontier=frontier)
