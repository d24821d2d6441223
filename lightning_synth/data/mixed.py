"""Real and synthetic data in one indexable dataset, each sample in the user's own format."""

from __future__ import annotations

from collections.abc import Mapping, Sized
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_synth.batch import TARGET_KEYS, BatchAdapter
from lightning_synth.data.pool import SyntheticPool

__all__ = ["MixedDataset"]


class MixedDataset(Dataset):
    """Indices ``0..n_real-1`` are the user's real samples, ``n_real..`` the synthetic pool's.

    A synthetic sample is written into the structure of a real one (``template``) with the batch adapter,
    so the user's ``training_step`` sees one format: a tuple stays a tuple, a dict keeps its keys (fields
    other than inputs and target are copied from the template), a Python-int target stays an int.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> real = TensorDataset(torch.zeros(3, 1, 2, 2), torch.tensor([0, 1, 2]))
        >>> mixed = MixedDataset(real, SyntheticPool(max_samples=4))
        >>> len(mixed), mixed[2][1].item()
        (3, 2)
    """

    def __init__(self, real: Dataset, pool: SyntheticPool, adapter: BatchAdapter | None = None) -> None:
        if not isinstance(real, Sized):
            raise TypeError(f"`real` must be a sized map-style dataset, got {type(real).__name__}")
        if len(real) == 0:
            raise ValueError("`real` must not be empty: the wrapped datamodule's train set has no samples")
        self.real, self.pool = real, pool
        self.adapter = adapter or BatchAdapter()
        self.num_real = len(real)
        self.template = real[0]

    def __len__(self) -> int:
        return self.num_real + len(self.pool)

    def __getitem__(self, index: int) -> Any:
        if index < self.num_real:
            return self.real[index]
        inputs, target = self.pool[index - self.num_real]
        return self._as_real(inputs, target)

    def _as_real(self, inputs: Tensor, target: Tensor) -> Any:
        template = self.template
        template_target = _sample_target(template, self.adapter)
        value: Any = int(target) if isinstance(template_target, int) else target.to(
            template_target.dtype if isinstance(template_target, Tensor) else torch.long)
        packed = self.adapter.pack(template, inputs, value)
        if isinstance(template, Mapping):
            return {**template, **packed}
        if isinstance(template, (tuple, list)) and len(template) > 2:
            return type(template)([*packed, *template[2:]])
        return packed


def _sample_target(sample: Any, adapter: BatchAdapter) -> Any:
    if isinstance(sample, Mapping):
        for key in (adapter.target_key, *TARGET_KEYS):
            if key in sample:
                return sample[key]
    if isinstance(sample, (tuple, list)) and len(sample) >= 2:
        return sample[1]
    return None
