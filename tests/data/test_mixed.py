import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

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
    assert all(_equal(a, b) for a, b in zip(mixed.__getitems__(indices), [mixed[i] for i in indices], strict=True))
    assert mixed.__getitems__([]) == []


def test_the_data_loader_fetches_through_the_batched_path():
    pool = _pool(4, "uint8")
    mixed = MixedDataset(TensorDataset(torch.rand(5, 1, 4, 4), torch.arange(5)), pool)
    reads = []
    read = pool.read
    pool.read = lambda indices: reads.append(list(indices)) or read(indices)  # type: ignore[method-assign]
    batches = list(DataLoader(mixed, batch_size=9))
    assert reads == [[0, 1, 2, 3]] and batches[0][0].shape == (9, 1, 4, 4)
    assert torch.equal(batches[0][1], torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 0]))
