"""Ladder search: the hits of a probe pass's cells from fewer perturbed forwards.

Along one perturbation's severity ladder a probe sample keeps its parameters (the same keyed draws, scaled by
the level's magnitude), so a sample the model gets right on clean input nearly always stays right up to some
level and wrong above it. For such samples the breaking level is found by a search over the planned levels
(bisection: about ``log2(L + 1)`` forwards instead of ``L``) and the hits of the other levels are read off it.
Samples the model gets wrong on clean input, whose perturbed hits flip back often, and the ``exact`` cells
(those near the failure frontier, where a small error moves the frontier) are scored on every sample; an exact
level's hits then bound each sample's search, and the last counts' survival along the ladder orders it
(:func:`search_splits`: a ladder most samples survive is probed at its top first).

Plain torch: the forwards come in as a callable that scores a list of requests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["Request", "ladder_hits", "search_splits"]

Request = tuple[int, int, Tensor]  # (perturbation, level index, sample positions): score these samples there
ScoreRequests = Callable[[list[Request]], list[Tensor]]  # requests -> the (len(positions),) bool hits of each


def search_splits(survival: Sequence[float]) -> Tensor:
    """The search over a ladder with the fewest expected forwards, given each level's survival.

    A clean-right sample's breaking index ``k`` (how many of the ``L`` searched levels it stays right at) is one
    of ``0..L``; with ``survival[j]`` the share of such samples still right at level ``j`` (non-increasing),
    ``k`` has probability ``survival[k - 1] - survival[k]``. Probing level ``m`` while ``k`` is known to lie in
    ``[low, high]`` leaves ``[m + 1, high]`` if the sample is right there and ``[low, m]`` if not. The returned
    ``(L + 1, L + 1)`` table holds, for each ``[low, high]``, the level to probe next on the optimal search tree
    (dynamic programming over intervals, as for an optimal binary search tree; ties go to the bisection's
    midpoint). Every outcome keeps a small probability, so a table for any survival finds every breaking level;
    uniform outcomes give plain bisection's expected cost.

    Example:
        >>> search_splits([0.9, 0.9, 0.9])[0, 3].item()  # most samples never break: probe the top level first
        2
        >>> search_splits([0.75, 0.5, 0.25])[0, 3].item()  # uniform outcomes: the midpoint
        1
    """
    levels = len(survival)
    surv = torch.tensor([1.0, *survival, 0.0], dtype=torch.float64).clamp(0.0, 1.0).cummin(0).values
    prob = (surv[:-1] - surv[1:]).clamp(min=0.0) + 1e-3  # outcome k = 0..L
    cost = torch.zeros(levels + 1, levels + 1, dtype=torch.float64)
    table = torch.zeros(levels + 1, levels + 1, dtype=torch.long)
    for width in range(1, levels + 1):
        for low in range(levels + 1 - width):
            high = low + width
            mid = (low + high) // 2
            weight = float(prob[low:high + 1].sum())
            best = min(range(low, high), key=lambda m: (round(float(cost[low, m] + cost[m + 1, high]), 9),
                                                        abs(m - mid), m))
            table[low, high] = best
            cost[low, high] = weight + cost[low, best] + cost[best + 1, high]
    return table


def ladder_hits(plan: Tensor, exact: Tensor, clean: Tensor, score: ScoreRequests, survival: Tensor | None = None,
                bound_by_exact: bool = True) -> tuple[dict[tuple[int, int], Tensor], int]:
    """The hits of every planned cell on every sample, and how many perturbed images were scored.

    Args:
        plan: ``(P, S)`` cells to measure.
        exact: ``(P, S)`` cells to score on every sample (all ``True``: no search, every cell scored).
        clean: ``(N,)`` clean hits of the samples.
        score: scores a list of requests, returning their hits in order (one call per search round).
        survival: ``(P, S)`` share of clean-right samples expected still right at each level (from the last
            counts); the search follows :func:`search_splits` of the searched levels' survival. ``None`` (or
            NaN in a ladder's searched levels): bisection.
        bound_by_exact: score the exact cells first and narrow each sample's search by their hits (``False``:
            the search ignores them).

    Returns:
        ``{(perturbation, level): (N,) bool hits}`` for the planned cells (measured or read off the breaking
        level), and the number of perturbed images scored.

    Example:
        >>> truth = torch.tensor([[[1, 1, 0, 1], [1, 0, 1, 1], [0, 0, 1, 0]]], dtype=torch.bool)  # (P, S, N)
        >>> score = lambda requests: [truth[p, s, idx] for p, s, idx in requests]
        >>> clean = torch.tensor([True, True, True, False])
        >>> plan = torch.ones(1, 3, dtype=torch.bool)
        >>> hits, scored = ladder_hits(plan, torch.zeros_like(plan), clean, score)
        >>> hits[(0, 0)].tolist(), scored  # sample 2, wrong at level 0 only, is read as right there
        ([True, True, True, True], 9)
        >>> ladder_hits(plan, plan, clean, score)[1]  # every cell exact: 3 cells x 4 samples
        12
    """
    clean = clean.cpu()
    everyone = torch.arange(len(clean))
    right, wrong = everyone[clean], everyone[~clean]
    hits: dict[tuple[int, int], Tensor] = {}
    requests: list[Request] = []
    searches: list[tuple[int, list[int], Tensor, Tensor, Tensor]] = []  # (perturbation, levels, low, high, splits)
    for p in range(plan.shape[0]):
        levels = plan[p].nonzero().flatten().tolist()
        searched = [s for s in levels if not bool(exact[p, s])]
        for s in levels:
            hits[(p, s)] = torch.zeros(len(clean), dtype=torch.bool)
            if s not in searched:
                requests.append((p, s, everyone))
            elif len(wrong):
                requests.append((p, s, wrong))
        if searched and len(right):  # breaking level in [low, high]: right below it, wrong from it on
            ends = torch.arange(len(searched) + 1)
            splits = (ends[:, None] + ends[None, :]) // 2  # bisection
            if survival is not None and not bool(survival[p, searched].isnan().any()):
                splits = search_splits(survival[p, searched].tolist())
            searches.append((p, searched, torch.zeros(len(right), dtype=torch.long),
                             torch.full((len(right),), len(searched), dtype=torch.long), splits))
    scored = 0
    if bound_by_exact and any(len(searched) < int(plan[p].sum()) for p, searched, *_ in searches):
        results = [r.cpu() for r in score(requests)]
        scored += sum(len(idx) for _, _, idx in requests)
        for (p, s, idx), row in zip(requests, results):
            hits[(p, s)][idx] = row
        requests = []
        for p, searched, low, high, _ in searches:
            for s in plan[p].nonzero().flatten().tolist():
                if s in searched:
                    continue
                bound = sum(j < s for j in searched)  # right at s: right at every searched level below it
                row = hits[(p, s)][right]
                up, down = row & (bound <= high), ~row & (bound >= low)  # ignored where it contradicts
                low[up] = low[up].clamp(min=bound)
                high[down] = high[down].clamp(max=bound)
    while True:
        probes: list[tuple[int, Tensor, Tensor]] = []  # (search, rows of `right`, the level index probed)
        for k, (p, searched, low, high, splits) in enumerate(searches):
            active = low < high
            mid = splits[low, high]
            for m in mid[active].unique().tolist():
                rows = (active & (mid == m)).nonzero().flatten()
                requests.append((p, searched[m], right[rows]))
                probes.append((k, rows, torch.full_like(rows, m)))
        if not requests:
            break
        results = [r.cpu() for r in score(requests)]
        scored += sum(len(idx) for _, _, idx in requests)
        direct = len(requests) - len(probes)
        for (p, s, idx), row in zip(requests[:direct], results[:direct]):
            hits[(p, s)][idx] = row
        for (k, rows, m), row in zip(probes, results[direct:]):
            low, high = searches[k][2], searches[k][3]
            low[rows] = torch.where(row, m + 1, low[rows])
            high[rows] = torch.where(row, high[rows], m)
        requests = []
    for p, searched, low, _, _ in searches:
        for j, s in enumerate(searched):
            hits[(p, s)][right] = j < low
    return hits, scored
