import torch

from lightning_synth.perturbations import PerturbationBank
from lightning_synth.probing import PerturbationProber
from lightning_synth.profile import WeaknessProfile
from lightning_synth.value_range import ValueRange


def _prober(**kwargs):
    return PerturbationProber(PerturbationBank(["rotation", "gaussian_noise"]), (1, 2, 3, 4, 5), **kwargs)


def _pass(prober, net, images, labels, world=1, rank=0):
    prober.start_pass(None, world=world, rank=rank, device=torch.device("cpu"))
    hits = net(images).argmax(1) == labels
    keep = torch.ones(len(labels), dtype=torch.bool)
    scored = prober.probe(images, labels, hits, keep, net, ValueRange.detect, lambda t: t)
    return scored, prober.finish_pass(lambda t: t)


def test_a_full_pass_scores_every_cell_on_the_budget_then_the_plan_narrows_to_the_frontier():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    images, labels = torch.rand(40, 1, 8, 8), torch.randint(0, 10, (40,))
    prober = _prober(max_samples=32, sequential=False, full_sweep_every=5, refresh_top=0, ladder_search=False)
    scored, counts = _pass(prober, net, images, labels)
    assert scored == 2 * 5 * 32  # every cell on the first 32 samples, never more than the budget
    assert counts[1, :, 1:].eq(32).all() and counts[1, :, 0].eq(32).all()
    profile = WeaknessProfile(frontier={"rotation": 3.2, "gaussian_noise": None})
    prober.after_analysis(profile, profile)  # frontiers did not move: windows around them
    plan = prober.probe_plan(profile)
    assert plan.tolist() == [[False, True, True, True, False], [False, False, False, True, True]]


def test_the_plan_is_full_again_every_full_sweep_every_analyses_and_after_a_moved_frontier():
    prober = _prober(full_sweep_every=2)
    prober.memory, prober.full_next = torch.zeros(4, 2, 6), False
    prober.analyses = 2
    assert prober.probe_plan(WeaknessProfile(frontier={"rotation": 2.0})).all()
    prober.analyses, prober.moved = 1, {"rotation"}
    plan = prober.probe_plan(WeaknessProfile(frontier={"rotation": 2.0, "gaussian_noise": 2.0}))
    assert plan[0].all() and plan[1].tolist() == [True, True, True, False, False]


def test_state_round_trips_and_a_memory_of_another_bank_is_dropped():
    prober = _prober()
    prober.memory, prober.moved, prober.analyses, prober.full_next = torch.ones(4, 2, 6), {"rotation"}, 3, False
    state = prober.state_dict()
    assert set(state) == {"analyses", "full_next", "moved", "memory"}
    again = _prober()
    again.load_state_dict(state)
    assert again.state_dict() == state
    other = PerturbationProber(PerturbationBank(["rotation"]), (1, 2, 3, 4, 5))
    other.load_state_dict(state)
    assert other.memory is None and other.full_next
    old = _prober()
    old.load_state_dict({}, analyses=4)  # a checkpoint from before the key
    assert old.analyses == 4 and old.full_next


def _counts(flips, n=64.0):
    """``(4, P, S)`` counts of cells on ``n`` clean hits, ``flips`` of them lost under the perturbation."""
    flips = torch.tensor(flips, dtype=torch.float64)
    total = torch.full_like(flips, n)
    return torch.stack([total - flips, total, total, flips])


def test_early_stages_stop_cells_settled_below_but_the_one_under_the_frontier():
    # levels 1-2 settle below (0 flips of 64), 3 does not (6), 4-5 settle above (40)
    counts = _counts([[0, 0, 6, 40, 40]])
    stop = PerturbationProber.stop_mask(counts, 0.1, rank_stage=False)
    assert stop.tolist() == [[True, False, False, False, False]]  # level 2 brackets the frontier: it goes on


def test_the_rank_stage_stops_all_but_the_unsettled_levels_that_may_hold_the_frontier():
    # level 3 reads 0.09 (unsettled, below the threshold), level 4 reads 0.16 (the crossing), 5 settles above
    counts = _counts([[0, 0, 6, 10, 40]])
    stop = PerturbationProber.stop_mask(counts, 0.1, rank_stage=True)
    assert stop.tolist() == [[True, True, False, False, True]]
    # a level above the crossing cannot move the frontier: it stops even when unsettled
    counts = _counts([[0, 12, 6, 7, 40]])
    assert PerturbationProber.stop_mask(counts, 0.1, rank_stage=True).tolist() == [[True, False, True, True, True]]


def test_quick_rows_stop_every_settled_cell_at_the_first_stage():
    counts = _counts([[0, 0, 6, 40, 40], [0, 0, 6, 40, 40]])
    stop = PerturbationProber.stop_mask(counts, 0.1, rank_stage=False, quick=torch.tensor([True, False]))
    assert stop.tolist() == [[True, True, False, True, True], [True, False, False, False, False]]


def test_a_window_pass_re_probes_the_cells_with_the_largest_last_gaps():
    prober = _prober(refresh_top=3)
    prober.memory, prober.full_next, prober.analyses = torch.zeros(4, 2, 6, dtype=torch.float64), False, 1
    prober.memory[1] = 100
    prober.memory[2] = 90  # clean hits
    prober.memory[0, 0, 1:] = torch.tensor([90, 88, 80, 40, 30])  # rotation: gaps .0 .02 .1 .5 .6
    prober.memory[0, 1, 1:] = torch.tensor([90, 90, 89, 85, 60])  # noise: gaps .0 .0 .01 .05 .3
    plan = prober.probe_plan(WeaknessProfile(frontier={"rotation": 3.0, "gaussian_noise": 4.8}))
    # windows: rotation 2-4, noise 4-5; refreshed: rotation@5, rotation@4, noise@5
    assert plan.tolist() == [[False, True, True, True, True], [False, False, False, True, True]]
    prober.refresh_top = 0
    assert prober.probe_plan(WeaknessProfile(frontier={"rotation": 1.0, "gaussian_noise": 4.8}))[0].tolist() == [
        True, True, False, False, False]


def test_quick_reads_read_the_first_analysis_and_moved_frontiers_quickly_the_defaults_never():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    images, labels = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    moved = WeaknessProfile(frontier={"rotation": 4.5, "gaussian_noise": 2.0})
    prober, precise = _prober(max_samples=64, quick_reads=True), _prober(max_samples=64)
    for p in (prober, precise):
        _pass(p, net, images, labels)
    assert prober.quick.all() and not precise.quick.any()  # no memory yet: quick reads read every row quickly
    for p in (prober, precise):
        p.after_analysis(moved, None)
        p.start_pass(moved, 1, 0, torch.device("cpu"))
    assert prober.quick.tolist() == [False, True]  # noise's frontier lies more than a level below the top
    assert not precise.quick.any()


def test_the_ladder_search_scores_the_cells_near_the_threshold_on_every_sample():
    prober = _prober(exact_band=0.05)
    assert not prober.exact_cells().any()  # no counts yet: every cell is searched
    prober.memory = torch.zeros(4, 2, 6, dtype=torch.float64)
    prober.memory[1], prober.memory[2] = 100, 90
    prober.memory[0, 0, 1:] = torch.tensor([90, 88, 80, 40, 30])  # rotation: gaps .0 .02 .1 .5 .6
    prober.memory[0, 1, 1:] = torch.tensor([90, 90, 86, 84, 60])  # noise: gaps .0 .0 .04 .06 .3
    prober.start_pass(None, world=1, rank=0, device=torch.device("cpu"))
    assert prober.exact_cells().tolist() == [[False, False, True, False, False], [False, False, False, True, False]]


def test_a_ladder_pass_counts_every_sample_in_every_cell_from_fewer_forwards_and_splits_over_ranks_alike():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    images, labels = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    labels[:40] = net(images[:40]).argmax(1)  # most samples right on clean input, as in a trained model
    kwargs = dict(max_samples=64, sequential=False)
    sweep_scored, sweep = _pass(_prober(ladder_search=False, **kwargs), net, images, labels)
    scored, counts = _pass(_prober(**kwargs), net, images, labels)
    assert scored < 0.8 * sweep_scored
    assert torch.equal(counts[1], sweep[1]) and torch.equal(counts[2], sweep[2])  # every sample in every cell
    ranks = [_pass(_prober(**kwargs), net, images[r::2], labels[r::2], world=2, rank=r) for r in (0, 1)]
    assert sum(s for s, _ in ranks) == scored and torch.equal(ranks[0][1] + ranks[1][1], counts)


def test_the_ladder_search_reads_its_odds_off_the_last_counts_summed_over_ranks():
    prober = _prober()
    prober.start_pass(None, world=1, rank=0, device=torch.device("cpu"))
    assert prober.survival() is None  # no counts yet: plain bisection
    memory = torch.zeros(4, 2, 6, dtype=torch.float64)
    memory[:, 0, 0] = torch.tensor([90.0, 100.0, 90.0, 0.0])  # clean column
    memory[:, 0, 3] = torch.tensor([80.0, 100.0, 90.0, 14.0])  # 12 right->wrong, 2 wrong->right: 78 of 90 stay right
    prober.load_state_dict({"memory": memory.tolist()})
    prober.start_pass(None, world=1, rank=0, device=torch.device("cpu"))
    survival = prober.survival()
    assert survival is not None and abs(float(survival[0, 2]) - 78 / 90) < 1e-9
    assert bool(survival[1].isnan().all())  # never measured: bisection for that ladder
