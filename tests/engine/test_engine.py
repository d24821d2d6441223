"""The engine without a Trainer: refresh, chunks, validation of generator output, weighting, state."""

import pickle
from dataclasses import replace

import pytest
import torch

from lightning_synth.data.sampler import AdaptiveSampler
from lightning_synth.engine import EpochContext, LocalComm, SynthesisEngine, resolve_budget
from lightning_synth.generators import SyntheticGenerator, TargetedAugmentation
from lightning_synth.generators.base import GenerationContext, SyntheticBatch
from lightning_synth.profile import Weakness, WeaknessProfile

N_REAL = 200


def real_data(low=0.0, high=1.0, dtype=torch.float32):
    inputs = (torch.rand(N_REAL, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * (high - low) + low)
    return inputs.to(dtype), torch.arange(N_REAL) % 10


def make_engine(generators=None, **kwargs):
    kwargs.setdefault("synthetic_budget", 64)
    kwargs.setdefault("real_cache_size", 100)
    engine = SynthesisEngine(generators or [TargetedAugmentation()], **kwargs)
    inputs, targets = real_data()
    sampler = AdaptiveSampler(range(N_REAL), seed=0)
    engine.bind(N_REAL, lambda index: (inputs[index], targets[index]), sampler)
    return engine


def profile():
    return WeaknessProfile(frontier={"rotation": 2.0}, weaknesses=[
        Weakness(kind="perturbation", name="rotation", severity=3, error_rate=0.6, gap=0.5, support=64)])


class Broken(SyntheticGenerator):
    def __init__(self, name, make):
        self.name, self.make = name, make

    def generate(self, profile, budget, context):
        return self.make(budget, context)


def _ok(budget, context, **changes):
    fields = dict(inputs=torch.rand(budget, 1, 8, 8), targets=torch.zeros(budget, dtype=torch.long),
                  weakness=["x"] * budget, quality=torch.ones(budget), generator="b")
    fields.update(changes)
    n = fields["inputs"].shape[0]
    fields["weakness"], fields["quality"] = ["x"] * n, torch.ones(n)
    if fields["targets"].shape[0] != n:
        fields["targets"] = torch.zeros(n, dtype=torch.long)
    return SyntheticBatch(**fields)


BAD_OUTPUTS = {
    "not_a_batch": (lambda b, c: (torch.zeros(b, 1, 8, 8), torch.zeros(b)), "not a SyntheticBatch"),
    "wrong_shape": (lambda b, c: _ok(b, c, inputs=torch.rand(b, 3, 8, 8)), "shape"),
    "wrong_dtype": (lambda b, c: _ok(b, c, inputs=torch.zeros(b, 1, 8, 8, dtype=torch.uint8)), "dtype"),
    "bad_labels": (lambda b, c: _ok(b, c, targets=torch.full((b,), 99)), "labels outside"),
    "too_many": (lambda b, c: _ok(b, c, inputs=torch.rand(b + 5, 1, 8, 8)), "samples for a budget"),
    "nan": (lambda b, c: _ok(b, c, inputs=torch.full((b, 1, 8, 8), float("nan"))), "NaN"),
}


@pytest.mark.parametrize("kind", sorted(BAD_OUTPUTS))
def test_a_generator_breaking_the_contract_is_skipped_by_name(kind):
    make, why = BAD_OUTPUTS[kind]
    engine = make_engine([TargetedAugmentation(), Broken(f"bad_{kind}", make)], min_generator_share=0.5)
    with pytest.warns(RuntimeWarning, match=f"Generator 'bad_{kind}' .*{why}"):
        report = engine.epoch_start(profile(), EpochContext(epoch=0), LocalComm())
    assert set(report.generated) == {"targeted"} and len(engine.pool) == 32


def test_nan_in_real_data_is_reported_as_the_users_data():
    engine = SynthesisEngine([TargetedAugmentation()], synthetic_budget=8, real_cache_size=50)
    inputs, targets = real_data()
    inputs[::4, 0, 0, 0] = float("nan")
    engine.bind(N_REAL, lambda index: (inputs[index], targets[index]))
    with pytest.raises(ValueError, match=r"Your real input data hold .* NaN"):
        engine.epoch_start(None, EpochContext(epoch=0), LocalComm())


def test_refresh_fills_pool_groups_sampler_and_follows_the_profile():
    engine = make_engine([TargetedAugmentation(uniform_floor=0.0)])  # pure targeting: the tilt is plain to see
    report = engine.epoch_start(profile(), EpochContext(epoch=0), LocalComm())
    assert report.generated == {"targeted": 64} and len(engine.pool) == 64
    assert engine.sampler is not None and engine.sampler.group_names == ["real", "synthetic/targeted"]
    assert len(engine.sampler.scores()) == N_REAL + 64
    assert report.metrics["synth/pool_size"] == 64.0
    rotation = sum(n for k, n in engine.pool.stats()["count_by_weakness"].items() if "rotation" in k)
    assert rotation > 32  # the weak perturbation gets most of the budget


def test_budget_is_bounded_by_the_pool_and_made_in_chunks():
    calls = []

    class Counting(TargetedAugmentation):
        def generate(self, profile, budget, context):
            calls.append(budget)
            return super().generate(profile, budget, context)

    engine = make_engine([Counting()], synthetic_budget=1_000_000, max_pool_samples=300, chunk_size=128)
    engine.epoch_start(None, EpochContext(epoch=0), LocalComm())
    assert calls == [128, 128, 44] and len(engine.pool) == 300  # never more than the pool keeps


def test_observe_and_reweight_use_the_losses_and_record_them_for_learned_eviction():
    engine = make_engine(eviction="learned", plateau_patience=0)
    engine.epoch_start(None, EpochContext(epoch=0), LocalComm())
    indices = torch.tensor([0, 1, N_REAL, N_REAL + 1])
    engine.observe(indices, torch.tensor([1.0, 1.0, 3.0, 5.0]))
    assert engine.pool.get(1).loss == 5.0 and engine.pool.get(2).loss is None
    metrics = engine.reweight(epoch=1)
    assert metrics["synth/loss_synthetic"] == 4.0 and metrics["synth/loss_real"] == 1.0
    engine.observe(indices, torch.tensor([1.0, 1.0, 3.0, 5.0]))  # no progress: plateau
    assert engine.reweight(epoch=2)["synth/weight"] < metrics["synth/weight"]


def test_state_round_trip_and_replay_give_the_identical_pool():
    engine = make_engine(max_pool_samples=100)
    for epoch in range(3):
        engine.epoch_start(profile() if epoch else None, EpochContext(epoch=epoch), LocalComm())
    state = pickle.loads(pickle.dumps(engine.state_dict()))
    assert state["pool"]["pixels"]["inputs"].numel() == 0 and len(pickle.dumps(state)) < 100_000
    again = SynthesisEngine([TargetedAugmentation()], synthetic_budget=64, real_cache_size=100, max_pool_samples=100)
    again.load_state_dict(state)
    inputs, targets = real_data()
    again.bind(N_REAL, lambda index: (inputs[index], targets[index]))
    assert again.restore(EpochContext(epoch=3)) > 0
    assert torch.equal(again.pool.sample_ids, engine.pool.sample_ids)
    assert all(torch.equal(again.pool[i][0], engine.pool[i][0]) for i in range(len(engine.pool)))
    assert again.weighting.state_dict() == engine.weighting.state_dict()


def test_resume_on_a_training_set_of_another_size_raises():
    engine = make_engine()
    engine.epoch_start(None, EpochContext(epoch=0), LocalComm())
    again = SynthesisEngine([TargetedAugmentation()], synthetic_budget=64)
    again.load_state_dict(engine.state_dict())
    with pytest.raises(ValueError, match="training set of 200 samples, this one has 150"):
        again.bind(150, lambda index: real_data())


def test_generators_see_unit_range_and_the_user_range_is_kept():
    seen = {}

    class Spy(TargetedAugmentation):
        def generate(self, profile, budget, context):
            seen["range"] = (float(context.real_inputs.min()), float(context.real_inputs.max()))
            seen["value_range"] = context.value_range
            return super().generate(profile, budget, context)

    engine = SynthesisEngine([Spy()], synthetic_budget=16, real_cache_size=100)
    inputs, targets = real_data(low=-0.5, high=2.5)  # mean/std-normalised-like data
    engine.bind(N_REAL, lambda index: (inputs[index], targets[index]))
    engine.epoch_start(None, EpochContext(epoch=0), LocalComm())
    low, high = seen["range"]
    assert 0.0 <= low < 0.05 and 0.95 < high <= 1.0
    assert seen["value_range"].low < -0.4 and seen["value_range"].high > 2.4


def test_resolve_budget_and_bad_arguments():
    assert resolve_budget(1 / 3, 60_000) == 20_000 and resolve_budget(1.0, 10**6) == 50_000
    with pytest.raises(TypeError, match="`synthetic_budget` must be an int"):
        SynthesisEngine(synthetic_budget="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`chunk_size` must be >= 1"):
        SynthesisEngine(chunk_size=0)
    with pytest.raises(TypeError, match="`generators` must hold SyntheticGenerator"):
        SynthesisEngine(generators=[object()])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="`pool_storage_dtype` must be one of"):
        SynthesisEngine(pool_storage_dtype="int8")  # type: ignore[arg-type]


def test_the_pool_keeps_pixels_as_uint8_by_default_and_exact_on_request():
    class Fixed(SyntheticGenerator):
        name = "fixed"

        def generate(self, profile, budget, context):
            inputs = torch.rand(budget, 1, 8, 8, generator=context.generator)
            return SyntheticBatch(inputs, torch.zeros(budget, dtype=torch.long), ["x"] * budget, torch.ones(budget),
                                  self.name)

    made = {}
    for dtype in ("uint8", "float32"):
        engine = make_engine([Fixed()], **({} if dtype == "uint8" else {"pool_storage_dtype": dtype}))
        engine.epoch_start(None, EpochContext(epoch=0), LocalComm())
        made[dtype] = torch.stack([engine.pool[i][0] for i in range(len(engine.pool))])
        assert engine.pool.nbytes < 64 * 8 * 8 * 4 if dtype == "uint8" else engine.pool.nbytes > 64 * 8 * 8 * 4
    assert made["uint8"].dtype == torch.float32
    assert torch.equal(made["uint8"], (made["float32"] * 255).round() / 255)  # the same samples, quantised
    assert (made["uint8"] - made["float32"]).abs().max() <= 0.5 / 255 + 1e-7


def test_a_stateful_generator_keeps_its_pixels_in_the_checkpoint():
    class Stateful(TargetedAugmentation):
        def __init__(self):
            super().__init__(name="stateful")
            self.calls = 0

        def generate(self, profile, budget, context):
            self.calls += 1  # outputs depend on state: not replayable
            return super().generate(profile, budget, context)

        def state_dict(self):
            return {"calls": self.calls}

        def load_state_dict(self, state_dict):
            self.calls = state_dict["calls"]

    engine = make_engine([Stateful(), TargetedAugmentation()])
    engine.epoch_start(None, EpochContext(epoch=0), LocalComm())
    state = engine.state_dict()
    kept = state["pool"]["pixels"]["inputs"]
    assert kept.shape[0] == engine.pool.stats()["count_by_generator"]["stateful"] > 0
    again = SynthesisEngine([Stateful(), TargetedAugmentation()], synthetic_budget=64, real_cache_size=100)
    again.load_state_dict(state)
    inputs, targets = real_data()
    again.bind(N_REAL, lambda index: (inputs[index], targets[index]))
    again.restore(EpochContext(epoch=1))
    assert all(torch.equal(again.pool[i][0], engine.pool[i][0]) for i in range(len(engine.pool)))
    assert again.generators[0].calls == 1


def _pool_pixels(engine):
    return torch.stack([engine.pool[i][0] for i in range(len(engine.pool))])


@pytest.mark.parametrize("origin", ["uint8", "float_over_255"])
def test_real_cache_of_8bit_data_is_kept_as_uint8_and_round_trips_exactly(origin, monkeypatch):
    levels = torch.randint(0, 256, (N_REAL, 1, 8, 8), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    data = levels if origin == "uint8" else levels.float() / 255  # as Fashion-MNIST is loaded
    targets = torch.arange(N_REAL) % 10
    contexts, full_reads = [], []
    whole = GenerationContext.real_inputs
    monkeypatch.setattr(GenerationContext, "real_inputs",
                        property(lambda self: full_reads.append(1) or whole.fget(self)))

    class Spy(TargetedAugmentation):
        def generate(self, profile, budget, context):
            contexts.append(context)
            return super().generate(profile, budget, context)

    engine = SynthesisEngine([Spy()], synthetic_budget=64, real_cache_size=100, chunk_size=16)
    engine.bind(N_REAL, lambda index: (data[index], targets[index]))
    engine.epoch_start(None, EpochContext(epoch=0), LocalComm())
    real = engine.real
    assert real.pixels.dtype == torch.uint8 and real.pixels.nbytes == 100 * 64  # a quarter of float32
    expected = levels[real.index].float() / 255  # what the cache held as float32 before
    assert real.inputs.dtype == torch.float32 and torch.equal(real.inputs, expected)
    # every chunk's context holds the cache's own levels; the generator decoded only the rows it drew
    assert len(contexts) == 4 and all(c.real_levels is real.pixels for c in contexts) and not full_reads
    assert all(torch.equal(c.real_inputs, expected) for c in contexts)  # a generator reading all sees the values


def test_a_uint8_real_cache_changes_no_sample_and_replays_identically():
    levels = torch.randint(0, 256, (N_REAL, 1, 8, 8), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    data, targets = levels.float() / 255, torch.arange(N_REAL) % 10
    pools, engines = [], []
    for exact_copy in (False, True):
        engine = SynthesisEngine([TargetedAugmentation()], synthetic_budget=64, real_cache_size=100,
                                 max_pool_samples=100)
        engine.bind(N_REAL, lambda index: (data[index], targets[index]))
        if exact_copy:  # the former float32 cache, for comparison
            engine._real = replace(engine.real, pixels=engine.real.inputs)
        assert engine.real.pixels.dtype == (torch.float32 if exact_copy else torch.uint8)
        for epoch in range(2):
            engine.epoch_start(profile() if epoch else None, EpochContext(epoch=epoch), LocalComm())
        pools.append(_pool_pixels(engine))
        engines.append(engine)
    assert torch.equal(pools[0], pools[1])
    again = SynthesisEngine([TargetedAugmentation()], synthetic_budget=64, real_cache_size=100, max_pool_samples=100)
    again.load_state_dict(pickle.loads(pickle.dumps(engines[0].state_dict())))
    again.bind(N_REAL, lambda index: (data[index], targets[index]))
    assert again.restore(EpochContext(epoch=2)) > 0
    assert again.real.pixels.dtype == torch.uint8 and torch.equal(_pool_pixels(again), pools[0])


def test_real_cache_of_other_data_stays_float32():
    engine = make_engine()  # torch.rand: not multiples of 1/255
    engine.epoch_start(None, EpochContext(epoch=0), LocalComm())
    inputs, _ = real_data()
    assert engine.real.pixels.dtype == torch.float32
    assert torch.equal(engine.real.inputs, inputs[engine.real.index]) and engine.real.inputs is engine.real.pixels
