import torch

from lightning_synth.ladder import ladder_hits, search_splits


def _scorer(truth, log):
    def score(requests):
        log.append(len(requests))
        return [truth[p, s, idx] for p, s, idx in requests]
    return score


def _monotone_truth(P, S, N, clean, generator):
    """Clean-right samples break at a random level (right below it, wrong from it on); the others are noise."""
    breaks = torch.randint(0, S + 1, (P, 1, N), generator=generator)
    truth = torch.arange(S).view(1, S, 1) < breaks
    noise = torch.rand(P, S, N, generator=generator) < 0.3
    return torch.where(clean.view(1, 1, N), truth, noise)


def test_monotone_ladders_are_read_exactly_from_fewer_forwards():
    g = torch.Generator().manual_seed(0)
    P, S, N = 3, 5, 200
    clean = torch.rand(N, generator=g) < 0.8
    truth = _monotone_truth(P, S, N, clean, g)
    plan = torch.ones(P, S, dtype=torch.bool)
    rounds: list[int] = []
    hits, scored = ladder_hits(plan, torch.zeros_like(plan), clean, _scorer(truth, rounds))
    assert set(hits) == {(p, s) for p in range(P) for s in range(S)}
    for (p, s), row in hits.items():
        assert torch.equal(row, truth[p, s])
    right = int(clean.sum())
    assert scored < 0.7 * P * S * N  # wrong samples at 5 levels, right ones at most 3
    assert scored <= P * (S * (N - right) + 3 * right)
    assert len(rounds) == 3  # one scoring call per bisection round (ceil(log2(5 + 1)))


def test_exact_cells_and_samples_the_model_gets_wrong_are_scored_at_every_level():
    g = torch.Generator().manual_seed(1)
    P, S, N = 2, 5, 64
    clean = torch.rand(N, generator=g) < 0.7
    truth = torch.rand(P, S, N, generator=g) < 0.5  # not monotone at all
    plan = torch.ones(P, S, dtype=torch.bool)
    exact = torch.zeros_like(plan)
    exact[0, 2] = exact[1, 0] = True
    hits, _ = ladder_hits(plan, exact, clean, _scorer(truth, []))
    assert torch.equal(hits[(0, 2)], truth[0, 2]) and torch.equal(hits[(1, 0)], truth[1, 0])
    for row, true in zip(hits.values(), truth.flatten(0, 1)):
        assert torch.equal(row[~clean], true[~clean])
    every, scored = ladder_hits(plan, plan, clean, _scorer(truth, []))  # all exact: a plain sweep
    assert scored == P * S * N and all(torch.equal(every[(p, s)], truth[p, s]) for p, s in every)


def test_only_the_planned_levels_are_searched():
    g = torch.Generator().manual_seed(2)
    P, S, N = 2, 5, 32
    clean = torch.ones(N, dtype=torch.bool)
    truth = _monotone_truth(P, S, N, clean, g)
    plan = torch.zeros(P, S, dtype=torch.bool)
    plan[0, 1:4] = True  # a window around a frontier
    asked: list[tuple[int, int]] = []

    def score(requests):
        asked.extend((p, s) for p, s, _ in requests)
        return [truth[p, s, idx] for p, s, idx in requests]

    hits, _ = ladder_hits(plan, torch.zeros_like(plan), clean, score)
    assert set(hits) == {(0, 1), (0, 2), (0, 3)} and set(asked) <= set(hits)
    for p, s in hits:  # monotone over the whole ladder, so over the window too
        assert torch.equal(hits[(p, s)], truth[p, s])
    assert ladder_hits(plan, plan, torch.zeros(0, dtype=torch.bool), score)[1] == 0  # no samples, no forwards


def test_a_search_guided_by_the_last_counts_reads_monotone_ladders_exactly_from_fewer_forwards():
    g = torch.Generator().manual_seed(3)
    P, S, N = 2, 5, 300
    clean = torch.ones(N, dtype=torch.bool)
    breaks = torch.where(torch.rand(P, 1, N, generator=g) < 0.8, S, torch.randint(0, S, (P, 1, N), generator=g))
    truth = torch.arange(S).view(1, S, 1) < breaks  # most samples never break: the top level first saves forwards
    plan = torch.ones(P, S, dtype=torch.bool)
    survival = truth.double().mean(-1)
    guided, guided_scored = ladder_hits(plan, torch.zeros_like(plan), clean, _scorer(truth, []), survival)
    _, bisection_scored = ladder_hits(plan, torch.zeros_like(plan), clean, _scorer(truth, []))
    assert all(torch.equal(guided[(p, s)], truth[p, s]) for p, s in guided)
    assert guided_scored < 0.75 * bisection_scored
    splits = search_splits([5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])  # every breaking level alike: bisection
    assert all(int(splits[lo, hi]) == (lo + hi) // 2 for lo in range(S + 1) for hi in range(lo + 1, S + 1))


def test_an_exact_level_bounds_the_search_of_the_levels_around_it():
    g = torch.Generator().manual_seed(4)
    P, S, N = 1, 5, 120
    clean = torch.rand(N, generator=g) < 0.8
    truth = _monotone_truth(P, S, N, clean, g)
    plan, exact = torch.ones(P, S, dtype=torch.bool), torch.zeros(P, S, dtype=torch.bool)
    exact[0, 2] = True
    per_sample = torch.zeros(N, dtype=torch.long)

    def score(requests):
        for _, s, idx in requests:
            per_sample[idx] += int(s != 2)
        return [truth[p, s, idx] for p, s, idx in requests]

    hits, _ = ladder_hits(plan, exact, clean, score)
    assert all(torch.equal(hits[(0, s)], truth[0, s]) for s in range(S))
    assert int(per_sample[clean].max()) <= 2  # two levels left on either side of the exact one
