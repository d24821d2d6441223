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
    prober = _prober(max_samples=32, sequential=False, full_sweep_every=5)
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
