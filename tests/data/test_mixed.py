import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_synth.batch import BatchAdapter
from lightning_synth.data.mixed import MixedDataset
from lightning_synth.data.pool import SyntheticPool
from lightning_synth.generators.base import SyntheticBatch
from lightning_synth.value_range import ValueRange


class DictDataset(Dataset):
    """Dict samples with an extra group field, as many user datasets yield."""

    def __init__(self, n):
        self.inputs, self.targets = torch.rand(n, 1, 4, 4), torch.arange(n) % 3

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return {"image": self.inputs[i], "label": int(self.targets[i]), "group": torch.tensor(1)}


def _pool(n, storage_dtype):
    pool = SyntheticPool(max_samples=n, storage_dtype=storage_dtype)
    pool.add(SyntheticBatch(torch.rand(n, 1, 4, 4), torch.arange(n) % 3, ["class/0"] * n, torch.ones(n), "aug"), 0)
    return pool


def _equal(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("storage_dtype", ["float32", "uint8"])
@pytest.mark.parametrize("kind", ["tuple", "dict", "uint8_range"])
def test_a_batched_fetch_gives_what_indexing_gives(kind, storage_dtype):
    if kind == "dict":
        mixed = MixedDataset(DictDataset(5), _pool(4, storage_dtype))
    elif kind == "uint8_range":
        real = TensorDataset((torch.rand(5, 1, 4, 4) * 255).to(torch.uint8), torch.arange(5))
        mixed = MixedDataset(real, _pool(4, storage_dtype), value_range=ValueRange(0, 255, dtype=torch.uint8))
    else:
        mixed = MixedDataset(TensorDataset(torch.rand(5, 1, 4, 4), torch.arange(5)), _pool(4, storage_dtype))
    indices = [7, 0, 5, 8, 2, 5]  # synthetic and real, in any order, repeated
    got = mixed.__getitems__(indices)
    assert all(_equal(a, b) for a, b in zip(got, [mixed[i] for i in indices], strict=True))
    for i, sample in zip(indices, got, strict=True):
        view = BatchAdapter().unpack(sample)
        if i < 5:
            assert _equal(sample, mixed.real[i])
        else:  # the pool's sample, mapped to the real range and dtype, in the real samples' structure
            inputs, target = mixed.pool[i - 5]
            assert _equal(view.inputs, mixed.value_range.from_unit(inputs)) and int(view.targets) == int(target)
            assert type(sample) is type(mixed.real[0]) and len(sample) == len(mixed.real[0])
    assert mixed.__getitems__([]) == []


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_deliver_source_pairs_each_sample_with_its_real_source(kind):
    real = DictDataset(6) if kind == "dict" else TensorDataset(torch.rand(6, 1, 4, 4), torch.arange(6) % 3)
    pool = SyntheticPool(max_samples=4)
    pool.add(SyntheticBatch(torch.rand(3, 1, 4, 4), torch.tensor([2, 0, 1]), ["class/0"] * 3, torch.ones(3), "aug",
                            source_index=torch.tensor([5, 3, -1])), 0)
    mixed = MixedDataset(real, pool, deliver_source=True)
    plain = MixedDataset(real, pool)

    def parts(sample):
        return (sample["image"], sample["source"]) if kind == "dict" else (sample[0], sample[-1])

    for i in range(len(mixed)):
        sample, without = mixed[i], plain[i]
        x, source = parts(sample)
        assert _equal({k: v for k, v in sample.items() if k != "source"} if kind == "dict" else sample[:-1], without)
        if i < 6 or i == 8:  # a real sample, or a synthetic one whose generator gave no source: itself
            assert torch.equal(source, x)
        else:  # the input of the real sample it was made from
            assert torch.equal(source, parts(mixed[{6: 5, 7: 3}[i]])[0])
    batch = next(iter(DataLoader(mixed, batch_size=9)))
    real_inputs = real.inputs if kind == "dict" else real.tensors[0]
    assert torch.equal(parts(batch)[1][6:8], real_inputs[[5, 3]])
    with pytest.raises(ValueError, match="`source_key` must not be a key of the real samples already, got 'label'"):
        MixedDataset(DictDataset(2), pool, deliver_source=True, source_key="label")
    with pytest.raises(TypeError, match="`deliver_source` needs samples that are dicts, tuples or lists, got Tensor"):
        MixedDataset(torch.zeros(3, 2), pool, deliver_source=True)  # type: ignore[arg-type]


def test_the_data_loader_fetches_through_the_batched_path():
    pool = _pool(4, "uint8")
    mixed = MixedDataset(TensorDataset(torch.rand(5, 1, 4, 4), torch.arange(5)), pool)
    reads = []
    read = pool.read
    pool.read = lambda indices: reads.append(list(indices)) or read(indices)  # type: ignore[method-assign]
    batches = list(DataLoader(mixed, batch_size=9))
    assert reads == [[0, 1, 2, 3]] and batches[0][0].shape == (9, 1, 4, 4)
    assert torch.equal(batches[0][1], torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 0]))
