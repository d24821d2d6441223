"""Ladder search: the hits of a probe pass's cells from fewer perturbed forwards.

Along one perturbation's severity ladder a probe sample keeps its parameters (the same keyed draws, scaled by
the level's magnitude), so a sample the model gets right on clean input nearly always stays right up to some
level and wrong above it. For such samples the breaking level is found by bisection over the planned levels
(about ``log2(L + 1)`` forwards instead of ``L``) and the hits of the other levels are read off it. Samples
the model gets wrong on clean input, whose perturbed hits flip back often, and the ``exact`` cells (those
near the failure frontier, where a small error moves the frontier) are scored on every sample.

Plain torch: the forwards come in as a callable that scores a list of requests.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["Request", "ladder_hits"]

Request = tuple[int, int, Tensor]  # (perturbation, level index, sample positions): score these samples there
ScoreRequests = Callable[[list[Request]], list[Tensor]]  # requests -> the (len(positions),) bool hits of each


def ladder_hits(plan: Tensor, exact: Tensor, clean: Tensor, score: ScoreRequests
                ) -> tuple[dict[tuple[int, int], Tensor], int]:
    """The hits of every planned cell on every sample, and how many perturbed images were scored.

    Args:
        plan: ``(P, S)`` cells to measure.
        exact: ``(P, S)`` cells to score on every sample (all ``True``: no search, every cell scored).
        clean: ``(N,)`` clean hits of the samples.
        score: scores a list of requests, returning their hits in order (one call per bisection round).

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
    searches: list[tuple[int, list[int], Tensor, Tensor]] = []  # (perturbation, levels, low, high) per ladder
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
            searches.append((p, searched, torch.zeros(len(right), dtype=torch.long),
                             torch.full((len(right),), len(searched), dtype=torch.long)))
    scored = 0
    while True:
        probes: list[tuple[int, Tensor, Tensor]] = []  # (search, rows of `right`, the level index probed)
        for k, (p, searched, low, high) in enumerate(searches):
            active = low < high
            mid = (low + high) // 2
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
    for p, searched, low, _ in searches:
        for j, s in enumerate(searched):
            hits[(p, s)][right] = j < low
    return hits, scored
