import pickle

import pytest
import torch

from lightning_synth.data.pool import SyntheticPool
from lightning_synth.generators.base import SyntheticBatch


def make_batch(n, generator="aug", quality=None, weakness=None, start=0, shape=(1, 4, 4)):
    """``n`` samples whose pixels all equal ``(start + i) / 100``, so a stored sample names its origin."""
    values = (torch.arange(start, start + n, dtype=torch.float32) / 100).view(-1, 1, 1, 1)
    inputs = values.expand(n, *shape).clone()
    quality = torch.ones(n) if quality is None else torch.as_tensor(quality, dtype=torch.float32)
    weakness = weakness or [f"class/{i % 3}" for i in range(start, start + n)]
    return SyntheticBatch(inputs, torch.arange(start, start + n), weakness, quality, generator)


def origins(pool):
    return sorted(round(float(pool[i][0].flatten()[0]) * 100) for i in range(len(pool)))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="`max_samples` must be an int >= 1"):
        SyntheticPool(max_samples=0)
    with pytest.raises(ValueError, match="`max_samples` must be an int >= 1"):
        SyntheticPool(max_samples=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`max_bytes` must be None or an int >= 1"):
        SyntheticPool(max_bytes=0)
    with pytest.raises(ValueError, match="`eviction` must be one of"):
        SyntheticPool(eviction="newest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`storage_dtype` must be one of"):
        SyntheticPool(storage_dtype="int8")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`seed` must be an int"):
        SyntheticPool(seed="0")  # type: ignore[arg-type]
    pool = SyntheticPool(max_samples=4)
    with pytest.raises(TypeError, match="`batch` must be a SyntheticBatch"):
        pool.add((torch.zeros(1, 1, 4, 4), torch.zeros(1)), epoch=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`epoch` must be an int >= 0"):
        pool.add(make_batch(2), epoch=-1)
    with pytest.raises(ValueError, match="quality outside"):
        pool.add(make_batch(2, quality=[0.5, 1.5]), epoch=0)
    with pytest.raises(TypeError, match="must be floating point"):
        pool.add(
            SyntheticBatch(
                torch.zeros(1, 1, 4, 4, dtype=torch.uint8), torch.zeros(1), ["x"], torch.ones(1), "g"
            ),
            0,
        )
    nan_batch = make_batch(1)
    nan_batch.inputs[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite inputs"):
        pool.add(nan_batch, epoch=0)
    pool.add(make_batch(2), epoch=0)
    with pytest.raises(ValueError, match=r"holds inputs of shape \(1, 4, 4\)"):
        pool.add(make_batch(2, shape=(3, 4, 4)), epoch=0)
    with pytest.raises(ValueError, match=r"`positions` must lie in \[0, 2\)"):
        pool.record_losses([2], torch.ones(1))
    with pytest.raises(ValueError, match="differ in length"):
        pool.record_losses([0, 1], torch.ones(1))
    with pytest.raises(IndexError, match="out of range"):
        pool[2]
    with pytest.raises(ValueError, match="`max_bytes`=10 is too small for one sample"):
        SyntheticPool(max_bytes=10).add(make_batch(1), epoch=0)


def test_bounded_by_count():
    pool = SyntheticPool(max_samples=5)
    update = pool.add(make_batch(3), epoch=0)
    assert len(pool) == 3 and update.appended.tolist() == [0, 1, 2] and update.replaced.numel() == 0
    update = pool.add(make_batch(4, start=3), epoch=1)
    assert len(pool) == 5 == update.size
    assert update.appended.tolist() == [3, 4]
    assert update.replaced.tolist() == [0, 1]
    assert update.evicted_ids.tolist() == [0, 1]
    assert update.positions.tolist() == [3, 4, 0, 1]
    assert update.sample_ids.tolist() == [3, 4, 5, 6]
    assert update.changed.tolist() == [0, 1, 3, 4]
    assert origins(pool) == [2, 3, 4, 5, 6]
    assert pool.stats()["evicted"] == 2


def test_batch_larger_than_capacity_is_truncated():
    pool = SyntheticPool(max_samples=3)
    pool.add(make_batch(2), epoch=0)
    update = pool.add(make_batch(5, start=10), epoch=1)
    assert update.dropped == 2 and len(pool) == 3
    assert origins(pool) == [10, 11, 12]

    best = SyntheticPool(max_samples=2, eviction="lowest_quality")
    best.add(make_batch(4, quality=[0.1, 0.9, 0.5, 0.8]), epoch=0)
    assert origins(best) == [1, 3]


def test_bounded_by_bytes():
    # 16 float32 pixels + int64 target + provenance (4 + 8 + 8 + 4 + 4 + 4 + 8 + 8 + 8) = 64 + 8 + 56 = 128 bytes.
    pool = SyntheticPool(max_samples=100, max_bytes=128 * 3 + 50)
    pool.add(make_batch(10), epoch=0)
    assert pool.capacity == 3 and len(pool) == 3
    assert pool.stats()["bytes"] == pool.nbytes == 3 * 128 <= 128 * 3 + 50
    # Half-precision storage fits more samples in the same bytes.
    half = SyntheticPool(max_samples=100, max_bytes=128 * 3 + 50, storage_dtype="float16")
    half.add(make_batch(10), epoch=0)
    assert half.capacity == (128 * 3 + 50) // (128 - 32) == 4


def test_oldest_eviction_across_adds():
    pool = SyntheticPool(max_samples=4, eviction="oldest")
    for epoch in range(3):
        pool.add(make_batch(2, start=10 * epoch), epoch=epoch)
    assert origins(pool) == [10, 11, 20, 21]
    assert sorted(pool.get(i).epoch for i in range(4)) == [1, 1, 2, 2]


def test_lowest_quality_eviction():
    pool = SyntheticPool(max_samples=4, eviction="lowest_quality")
    pool.add(make_batch(4, quality=[0.9, 0.2, 0.5, 0.2]), epoch=0)
    update = pool.add(make_batch(2, start=10, quality=[0.1, 0.1]), epoch=1)
    # The two 0.2 samples go (tie broken oldest first); new samples are never their own victims.
    assert update.replaced.tolist() == [1, 3]
    assert origins(pool) == [0, 2, 10, 11]


def test_learned_eviction_uses_recorded_losses():
    pool = SyntheticPool(max_samples=4, eviction="learned")
    pool.add(make_batch(4), epoch=0)
    # Positions 0 and 2 seen twice: their losses are averaged. Position 3 has no loss: evicted last.
    pool.record_losses(torch.tensor([0, 1, 2, 0, 2]), torch.tensor([0.1, 2.0, 0.9, 0.3, 0.9]))
    assert pool.get(0).loss == pytest.approx(0.2) and pool.get(3).loss is None
    update = pool.add(make_batch(2, start=10), epoch=1)
    assert update.replaced.tolist() == [0, 2]
    assert origins(pool) == [1, 3, 10, 11]
    assert pool.get(0).loss is None  # a new sample has no history
    # Stale losses (sample replaced since) are ignored when ids are given.
    pool.record_losses([0, 1], torch.tensor([5.0, 5.0]), sample_ids=torch.tensor([0, 1]))
    assert pool.get(0).loss is None and pool.get(1).loss == 5.0


def test_random_eviction_is_seeded_and_deterministic():
    def run(seed):
        pool = SyntheticPool(max_samples=6, eviction="random", seed=seed)
        for epoch in range(4):
            pool.add(make_batch(3, start=10 * epoch), epoch=epoch)
        return origins(pool)

    assert run(0) == run(0)
    assert len(set(map(tuple, (run(s) for s in range(5))))) > 1


def test_provenance_and_access():
    pool = SyntheticPool(max_samples=10)
    pool.add(
        make_batch(2, generator="aug", quality=[0.5, 1.0], weakness=["perturbation/rotation@3"] * 2), epoch=3
    )
    pool.add(make_batch(1, generator="gan", quality=[0.25], weakness=["class/7"], start=5), epoch=4)
    sample = pool.get(2)
    assert (sample.generator, sample.weakness, sample.quality, sample.epoch, sample.sample_id) == (
        "gan",
        "class/7",
        0.25,
        4,
        2,
    )
    assert sample.target.item() == 5 and sample.loss is None
    inputs, target = pool[-1]
    assert inputs.dtype == torch.float32 and inputs.shape == (1, 4, 4) and target.item() == 5
    inputs.fill_(9.0)  # items are copies: the pool is unchanged
    assert pool[2][0].max() == pytest.approx(0.05)
    assert pool.sample_ids.tolist() == [0, 1, 2]
    assert {k: v.tolist() for k, v in pool.indices_by_generator().items()} == {"aug": [0, 1], "gan": [2]}


def test_sources_are_the_real_indices_generators_report():
    pool = SyntheticPool(max_samples=10)
    batch = make_batch(3)
    pool.add(SyntheticBatch(batch.inputs, batch.targets, batch.weakness, batch.quality, "aug",
                            source_index=torch.tensor([7, -1, 2])), epoch=0)
    pool.add(make_batch(2, generator="gan"), epoch=0)  # a generator that reports no sources
    assert pool.sources([2, 0, 4, 1]).tolist() == [2, 7, -1, -1]
    assert pool.sources([-1]).tolist() == [-1]


def test_stats():
    pool = SyntheticPool(max_samples=10)
    pool.add(make_batch(2, generator="aug", quality=[0.5, 1.0], weakness=["a", "b"]), epoch=0)
    pool.add(make_batch(2, generator="gan", quality=[0.2, 0.4], weakness=["b", "b"], start=2), epoch=0)
    stats = pool.stats()
    assert stats["size"] == 4 and stats["capacity"] == 10 and stats["bytes"] == pool.nbytes > 0
    assert stats["count_by_generator"] == {"aug": 2, "gan": 2}
    assert stats["count_by_weakness"] == {"a": 1, "b": 3}
    assert stats["mean_quality_by_generator"] == pytest.approx({"aug": 0.75, "gan": 0.3})
    assert stats["mean_quality"] == pytest.approx(0.525)
    assert SyntheticPool().stats()["mean_quality"] is None


def test_clear():
    pool = SyntheticPool(max_samples=10)
    pool.add(make_batch(2, generator="aug"), epoch=0)
    pool.add(make_batch(3, generator="gan", start=2), epoch=0)
    pool.clear()
    assert len(pool) == 0 and pool.stats()["count_by_generator"] == {}
    update = pool.add(make_batch(1, shape=(3, 2, 2)), epoch=1)  # a new shape is fine after clear
    assert update.sample_ids.tolist() == [5]  # ids never repeat


def test_recipes_replace_pixels_in_the_checkpoint():
    pool = SyntheticPool(max_samples=6)
    first, second, fixed = make_batch(4), make_batch(4, start=4), make_batch(2, generator="gan", start=8)
    pool.add(first, 0, recipe={"call": "first"})
    pool.add(second, 1, recipe={"call": "second"})  # evicts samples 0 and 1 of `first`
    pool.add(fixed, 2)  # no recipe: pixels stay in the checkpoint; evicts the rest of `first`
    state = pickle.loads(pickle.dumps(pool.state_dict()))
    assert state["pixels"]["inputs"].shape[0] == 2  # only the recipe-less samples carry pixels
    assert list(state["chunks"].values()) == [{"call": "second"}]  # `first` has no survivor left
    resumed = SyntheticPool(max_samples=6)
    resumed.load_state_dict(state)
    assert list(resumed.pending_recipes().values()) == [{"call": "second"}]
    with pytest.raises(RuntimeError, match="has not been replayed"):
        resumed[0]
    with pytest.raises(RuntimeError, match="has not been replayed"):
        resumed.read([5, 0])
    (chunk,) = resumed.pending_recipes()
    resumed.restore_chunk(chunk, second)
    assert resumed.pending_recipes() == {} and origins(resumed) == origins(pool)
    assert_same(pool, resumed)
    with pytest.raises(ValueError, match="not deterministic"):
        resumed.restore_chunk(chunk, make_batch(1))


@pytest.mark.parametrize("storage_dtype", ["float16", "uint8"])
def test_compact_storage(storage_dtype):
    pool = SyntheticPool(storage_dtype=storage_dtype)
    batch = make_batch(8)
    pool.add(batch, epoch=0)
    stored = torch.stack([pool[i][0] for i in range(8)])
    assert stored.dtype == torch.float32
    torch.testing.assert_close(stored, batch.inputs, atol=1 / 255, rtol=0)


def test_state_round_trip_is_identical():
    def grow(pool, epochs):
        for epoch in epochs:
            pool.add(make_batch(3, generator=f"g{epoch % 2}", quality=torch.rand(3), start=10 * epoch), epoch)
            pool.record_losses(torch.arange(len(pool)), torch.rand(len(pool)))

    torch.manual_seed(0)
    original = SyntheticPool(max_samples=7, eviction="random", storage_dtype="uint8", seed=3)
    grow(original, range(3))
    resumed = SyntheticPool(max_samples=7, eviction="random", storage_dtype="uint8", seed=99)
    resumed.load_state_dict(pickle.loads(pickle.dumps(original.state_dict())))
    assert_same(original, resumed)
    torch.manual_seed(1)
    grow(original, range(3, 6))
    torch.manual_seed(1)
    grow(resumed, range(3, 6))  # same RNG state -> same random evictions
    assert_same(original, resumed)


def assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa["store"]:
        torch.testing.assert_close(sa["store"][key], sb["store"][key], equal_nan=True, rtol=0, atol=0)
    assert torch.equal(sa["rng_state"], sb["rng_state"])
    if sa["pixels"] is not None:
        assert torch.equal(sa["pixels"]["inputs"], sb["pixels"]["inputs"])
    skip = ("store", "rng_state", "pixels")
    assert {k: v for k, v in sa.items() if k not in skip} == {k: v for k, v in sb.items() if k not in skip}
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(len(a)))
    assert [a.get(i).sample_id for i in range(len(a))] == [b.get(i).sample_id for i in range(len(b))]


def test_load_state_checks_bounds_and_converts_dtype():
    pool = SyntheticPool(max_samples=5)
    pool.add(make_batch(5), epoch=0)
    state = pool.state_dict()
    with pytest.raises(ValueError, match="holds 5 samples but `max_samples`=3"):
        SyntheticPool(max_samples=3).load_state_dict(state)
    with pytest.raises(ValueError, match="pool state version"):
        SyntheticPool().load_state_dict({"version": 0})
    half = SyntheticPool(max_samples=5, storage_dtype="float16")
    half.load_state_dict(state)
    torch.testing.assert_close(half[4][0], pool[4][0], atol=1e-3, rtol=0)
    empty = SyntheticPool()
    empty.load_state_dict(SyntheticPool().state_dict())
    assert len(empty) == 0


def test_pickles_for_dataloader_workers():
    pool = SyntheticPool(max_samples=8)
    pool.add(make_batch(8), epoch=0)
    copy = pickle.loads(pickle.dumps(pool))
    assert origins(copy) == origins(pool)
    loader = torch.utils.data.DataLoader(pool, batch_size=4)
    inputs, targets = next(iter(loader))
    assert inputs.shape == (4, 1, 4, 4) and targets.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("storage_dtype", ["float32", "uint8"])
def test_read_gives_a_batch_of_what_indexing_gives(storage_dtype):
    pool = SyntheticPool(max_samples=8, storage_dtype=storage_dtype)
    pool.add(make_batch(6), epoch=0)
    inputs, targets = pool.read([4, -1, 0, 4])
    for row, index in enumerate([4, -1, 0, 4]):
        assert torch.equal(inputs[row], pool[index][0]) and torch.equal(targets[row], pool[index][1])
    assert pool.read([])[0].shape == (0, 1, 4, 4)
    with pytest.raises(IndexError, match="out of range"):
        pool.read([0, 6])
