import math

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lightning_synth.data.sampler import AdaptiveSampler, systematic_draw, tempered_probabilities


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dataset": 5}, TypeError, "`dataset`"),
        ({"dataset": []}, ValueError, "`dataset` must not be empty"),
        ({"num_replicas": 0}, ValueError, "`num_replicas` must be an integer >= 1"),
        ({"num_replicas": 2, "rank": 2}, ValueError, r"`rank` must be in \[0, 1\]"),
        ({"rank": -1}, ValueError, "`rank` must be an integer >= 0"),
        ({"seed": 1.5}, ValueError, "`seed`"),
        ({"num_samples": 0}, ValueError, "`num_samples` must be an integer >= 1 or None, got 0"),
        ({"temperature": 0.0}, ValueError, "`temperature` must be a number > 0"),
        ({"temperature": float("nan")}, ValueError, "`temperature`"),
        ({"uniform_mix": 1.5}, ValueError, r"`uniform_mix` must be a number in \[0, 1\], got 1.5"),
        ({"ema_decay": 1.0}, ValueError, r"`ema_decay` must be a number in \[0, 1\)"),
        ({"prior": "median"}, ValueError, "`prior` must be 'mean' or 'max', got 'median'"),
        ({"draw": "stratified"}, ValueError, "`draw` must be 'systematic' or 'multinomial'"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    kwargs = {"dataset": range(10), **kwargs}
    with pytest.raises(error, match=match):
        AdaptiveSampler(**kwargs)


def test_bad_runtime_arguments_raise():
    sampler = AdaptiveSampler(range(10))
    with pytest.raises(ValueError, match=r"`indices` must hold indices in \[0, 10\)"):
        sampler.update(torch.tensor([10]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="same length, got 2 and 1"):
        sampler.update(torch.tensor([0, 1]), torch.tensor([1.0]))
    with pytest.raises(TypeError, match="integer indices"):
        sampler.update(torch.tensor([0.5]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="names must be non-empty strings other than 'real'"):
        sampler.set_groups({"real": torch.tensor([0])})
    with pytest.raises(ValueError, match="must be disjoint"):
        sampler.set_groups({"a": torch.tensor([0, 1]), "b": torch.tensor([1, 2])})
    with pytest.raises(ValueError, match="must be disjoint"):
        sampler.set_groups({"a": torch.tensor([3, 3])})
    with pytest.raises(TypeError, match="`groups` must be a dict"):
        sampler.set_groups([torch.tensor([0])])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`scale` must be a finite number >= 0, got -1"):
        sampler.set_group_scale("synthetic", -1)
    with pytest.raises(ValueError, match="`scale`"):
        sampler.set_group_scale("synthetic", float("inf"))
    with pytest.raises(ValueError, match="`n` must be an integer >= 1, got 0"):
        sampler.resize(0)
    with pytest.raises(KeyError, match="missing"):
        sampler.load_state_dict({"n": 10})
    sampler.set_group_scale("real", 0.0)
    with pytest.raises(RuntimeError, match="no probability mass left"):
        sampler.probabilities()


def test_is_a_distributed_sampler_that_works_without_a_process_group():
    sampler = AdaptiveSampler(range(7))
    assert isinstance(sampler, DistributedSampler)
    assert (sampler.num_replicas, sampler.rank, len(sampler)) == (1, 0, 7)
    assert sorted(sampler) == list(range(7))  # uniform weights + systematic draw: a permutation
    assert sampler.epoch_indices.tolist() == list(sampler)


@pytest.mark.parametrize(
    ("n", "replicas", "drop_last", "per_rank"), [(10, 3, False, 4), (10, 3, True, 3), (8, 2, False, 4)]
)
def test_ranks_take_disjoint_shards_of_one_draw(n, replicas, drop_last, per_rank):
    losses = torch.rand(n, generator=torch.Generator().manual_seed(1))
    samplers = [AdaptiveSampler(range(n), replicas, rank, seed=3, drop_last=drop_last) for rank in range(replicas)]
    for sampler in samplers:
        sampler.update(torch.arange(n), losses)
        sampler.set_epoch(2)
    shards = [torch.tensor(list(s)) for s in samplers]
    assert all(len(s) == per_rank == shard.numel() for s, shard in zip(samplers, shards, strict=True))
    # the shards interleave back into one draw that a single-process sampler makes with the same weights
    draw = torch.stack(shards, 1).reshape(-1)
    single = AdaptiveSampler(range(n), 1, 0, seed=3, num_samples=per_rank * replicas)
    single.update(torch.arange(n), losses)
    single.set_epoch(2)
    assert draw.tolist() == list(single)
    assert samplers[0].total_size == per_rank * replicas


def test_same_weights_same_draw_and_epoch_changes_it():
    a, b = AdaptiveSampler(range(50), seed=1), AdaptiveSampler(range(50), seed=1)
    losses = torch.linspace(0.1, 2.0, 50)
    a.update(torch.arange(50), losses)
    b.update(torch.arange(50), losses)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)


def test_draw_follows_probabilities():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64)
    counts = torch.bincount(systematic_draw(probs, 800, torch.Generator().manual_seed(0)), minlength=4)
    assert counts.tolist() == [400, 200, 100, 100]
    sampler = AdaptiveSampler(range(4), temperature=1.0, uniform_mix=0.0, draw="multinomial", num_samples=4000)
    sampler.update(torch.arange(4), probs)
    counts = torch.bincount(torch.tensor(list(sampler)), minlength=4).double() / 4000
    assert torch.allclose(counts, probs, atol=0.03)


def test_update_ema_prior_and_reset():
    sampler = AdaptiveSampler(range(4), ema_decay=0.5, uniform_mix=0.0)
    sampler.update(torch.tensor([0, 0, 1]), torch.tensor([1.0, 3.0, 4.0]))  # repeated index: mean first
    assert sampler.scores().tolist() == [2.0, 4.0, 3.0, 3.0]  # unseen get the mean of seen
    sampler.update(torch.tensor([0]), torch.tensor([4.0]))
    assert sampler.scores()[0] == 3.0
    sampler.prior = "max"
    assert sampler.scores()[2:].tolist() == [4.0, 4.0]
    sampler.reset(torch.tensor([0, 1]))
    assert sampler.stats()["seen_ratio"] == 0.0
    assert torch.allclose(sampler.probabilities(), torch.full((4,), 0.25, dtype=torch.float64))


def test_non_finite_losses_are_skipped_with_a_count():
    sampler = AdaptiveSampler(range(5))
    sampler.update(torch.arange(5), torch.ones(5))
    before = sampler.probabilities()
    with pytest.warns(RuntimeWarning, match=r"skipped 3 of 4 non-finite losses .* indices \[0, 1, 2\]"):
        sampler.update(torch.tensor([0, 1, 2, 3]), torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0]))
    assert torch.equal(sampler.probabilities(), before)
    assert torch.isfinite(sampler.probabilities()).all()


def test_temperature_and_uniform_floor():
    losses = torch.tensor([0.0, 0.01, 1.0, 100.0])
    hot = AdaptiveSampler(range(4), temperature=1e6, uniform_mix=0.0)
    hot.update(torch.arange(4), losses.clamp_min(1e-3))
    assert torch.allclose(hot.probabilities(), torch.full((4,), 0.25, dtype=torch.float64), atol=1e-4)
    floored = AdaptiveSampler(range(4), temperature=0.1, uniform_mix=0.2)
    floored.update(torch.arange(4), losses)
    probs = floored.probabilities()
    assert probs.min() >= 0.2 / 4 - 1e-12
    assert math.isclose(float(probs.sum()), 1.0)
    assert tempered_probabilities(torch.tensor([1.0, 1e30]), 1e-3, 0.0).tolist() == [0.0, 1.0]  # no overflow


def test_groups_scales_and_mass():
    sampler = AdaptiveSampler(range(10), uniform_mix=1.0)
    sampler.set_group_scale("synthetic", 3.0)  # kept until the group exists
    assert sampler.group_mass() == {"real": pytest.approx(1.0)}
    sampler.set_groups({"synthetic": torch.tensor([8, 9])})
    mass = sampler.group_mass()
    assert mass["synthetic"] == pytest.approx(6 / 14) and sum(mass.values()) == pytest.approx(1.0)
    assert sampler.stats()["mass/synthetic"] == pytest.approx(6 / 14)
    sampler.set_group_scale("synthetic", 0.0)
    assert not {8, 9} & set(sampler)
    sampler.set_groups({})
    assert sampler.group_mass() == {"real": pytest.approx(1.0)}


def test_resize_follows_the_dataset_and_new_samples_get_the_prior():
    data = list(range(6))
    sampler = AdaptiveSampler(data, uniform_mix=0.0)
    sampler.update(torch.arange(6), torch.tensor([1.0, 1.0, 1.0, 3.0, 3.0, 3.0]))
    sampler.set_groups({"synthetic": torch.tensor([4, 5])})
    data.extend([6, 7])  # the dataset grew: the next draw resizes
    assert len(list(sampler)) == 8 and len(sampler) == 8
    assert sampler.scores()[6:].tolist() == [2.0, 2.0]
    sampler.resize(5)
    assert sampler.probabilities().numel() == 5
    assert sampler.state_dict()["groups"]["synthetic"].tolist() == [4]


def test_stats_keys():
    stats = AdaptiveSampler(range(4)).stats()
    assert set(stats) == {"ess", "ess_ratio", "max_weight", "min_weight", "seen_ratio", "mass/real"}
    assert stats["ess"] == pytest.approx(4.0) and stats["max_weight"] == pytest.approx(1.0)


def test_state_dict_round_trip_reproduces_the_next_draw():
    sampler = AdaptiveSampler(range(20), seed=5)
    sampler.update(torch.arange(20), torch.rand(20, generator=torch.Generator().manual_seed(0)))
    sampler.set_groups({"synthetic": torch.arange(15, 20)})
    sampler.set_group_scale("synthetic", 0.5)
    sampler.set_epoch(3)
    restored = AdaptiveSampler(range(20), seed=5)
    restored.load_state_dict(sampler.state_dict())
    assert torch.equal(restored.probabilities(), sampler.probabilities())
    assert list(restored) == list(sampler)
    assert restored.group_mass() == sampler.group_mass()


def test_works_inside_a_dataloader_with_workers():
    sampler = AdaptiveSampler(range(12), seed=0)
    loader = DataLoader(range(12), batch_size=5, sampler=sampler, num_workers=1)
    seen = torch.cat(list(loader))
    assert seen.tolist() == sampler.epoch_indices.tolist()


def test_irreducible_losses_are_reset_with_the_sample_resized_and_checkpointed():
    sampler = AdaptiveSampler(range(4))
    assert torch.isnan(sampler.irreducible_losses).all()
    sampler.irreducible_losses[torch.tensor([0, 2])] = torch.tensor([0.5, 1.5], dtype=torch.float64)
    sampler.reset(torch.tensor([2]))  # a replaced synthetic sample needs a new estimate
    assert sampler.irreducible_losses[0] == 0.5 and torch.isnan(sampler.irreducible_losses[2])
    sampler.resize(6)
    assert sampler.irreducible_losses.shape == (6,) and torch.isnan(sampler.irreducible_losses[5])
    restored = AdaptiveSampler(range(6))
    restored.load_state_dict(sampler.state_dict())
    assert torch.equal(restored.irreducible_losses.nan_to_num(-1), sampler.irreducible_losses.nan_to_num(-1))
