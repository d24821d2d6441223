"""Small real datasets that need no network: Fashion-MNIST (Debian's IDX files) and scikit-learn digits.

Used by the examples, tests and benchmarks. Nothing here downloads anything: Fashion-MNIST is read from
``$FASHION_MNIST_DIR`` or ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = [
    "FASHION_MNIST_CLASSES",
    "DictDataset",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "fashion_mnist_dir",
    "load_digits_tensors",
    "load_fashion_mnist",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def fashion_mnist_dir() -> Path:
    """Where the Fashion-MNIST IDX files are: ``$FASHION_MNIST_DIR`` or Debian's install path."""
    return Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str = "train", root: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """Load a Fashion-MNIST split as float images ``(N, 1, 28, 28)`` in [0, 1] and int64 labels ``(N,)``.

    Raises:
        ValueError: if ``split`` is not ``"train"`` or ``"test"``.
        FileNotFoundError: if the IDX files are missing, with the command that installs them.
    """
    if split not in _FILES:
        raise ValueError(f"`split` must be 'train' or 'test', got {split!r}")
    folder = Path(root) if root is not None else fashion_mnist_dir()
    paths = [folder / name for name in _FILES[split]]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found: {missing}. Install them with "
            "`apt-get update && apt-get install -y dataset-fashion-mnist` or set $FASHION_MNIST_DIR."
        )
    images = torch.from_numpy(_read_idx(paths[0]).copy()).float().div_(255.0).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(paths[1]).astype(np.int64))
    return images, labels


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 8x8 digits as float images ``(N, 1, 8, 8)`` in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    return images, torch.tensor(digits.target, dtype=torch.int64)


class DictDataset(Dataset):
    """Samples as dicts ``{"image": x, "label": y, **extra}``: to exercise dict-batch projects."""

    def __init__(self, images: Tensor, labels: Tensor, **extra: Tensor) -> None:
        self.images, self.labels, self.extra = images, labels, extra

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        item = {"image": self.images[index], "label": self.labels[index]}
        item.update({k: v[index] for k, v in self.extra.items()})
        return item


class _TensorDataModule(L.LightningDataModule):
    def __init__(self, batch_size: int, num_workers: int, seed: int) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0, got {num_workers}")
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("Call `setup()` before asking for a dataloader.")
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


def _subset(images: Tensor, labels: Tensor, n: int | None, seed: int) -> tuple[Tensor, Tensor]:
    if n is None or n >= len(labels):
        return images, labels
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n]
    return images[idx], labels[idx]


class FashionMNISTDataModule(_TensorDataModule):
    """Fashion-MNIST as ``(image, label)`` batches: train/val split of the official train set, test set.

    Args:
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        val_size: samples of the official train split held out for validation.
        train_size: optional cap on training samples (a seeded random subset), for quick runs.
        test_size: optional cap on test samples.
        seed: seed of the split and subsets.
        root: folder with the IDX files (default: Debian's path or ``$FASHION_MNIST_DIR``).

    Example:
        >>> dm = FashionMNISTDataModule(batch_size=32, train_size=256, val_size=128)  # doctest: +SKIP
    """

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: int = 5000,
        train_size: int | None = None,
        test_size: int | None = None,
        seed: int = 0,
        root: str | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        if not 0 < val_size < 60000:
            raise ValueError(f"`val_size` must be in (0, 60000), got {val_size}")
        for name, value in (("train_size", train_size), ("test_size", test_size)):
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be >= 1 or None, got {value}")
        self.val_size, self.train_size, self.test_size, self.root = val_size, train_size, test_size, root

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = load_fashion_mnist("train", self.root)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        val_idx, train_idx = order[: self.val_size], order[self.val_size :]
        train = _subset(images[train_idx], labels[train_idx], self.train_size, self.seed)
        self.train_set = TensorDataset(*train)
        self.val_set = TensorDataset(images[val_idx], labels[val_idx])
        self.test_set = TensorDataset(*_subset(*load_fashion_mnist("test", self.root), self.test_size, self.seed))


class DigitsDataModule(_TensorDataModule):
    """scikit-learn digits (8x8) as ``(image, label)`` batches; a seeded train/val/test split.

    Example:
        >>> dm = DigitsDataModule(batch_size=64)
        >>> dm.setup()
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape)
        (64, 1, 8, 8)
    """

    def __init__(self, batch_size: int = 64, num_workers: int = 0, val_size: int = 400, seed: int = 0) -> None:
        super().__init__(batch_size, num_workers, seed)
        # val_size samples go to validation and as many to test, out of 1,797: keep at least ~100 to train.
        if not 0 < val_size <= 850:
            raise ValueError(f"`val_size` must be in (0, 850] (validation and test take it each), got {val_size}")
        self.val_size = val_size

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = load_digits_tensors()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        val, test, train = order[: self.val_size], order[self.val_size : 2 * self.val_size], order[2 * self.val_size :]
        self.train_set = TensorDataset(images[train], labels[train])
        self.val_set = TensorDataset(images[val], labels[val])
        self.test_set = TensorDataset(images[test], labels[test])
