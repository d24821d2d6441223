"""The records of a :class:`~lightning_synth.data.pool.SyntheticPool`: update and sample views, storage codecs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["EvictionPolicy", "PoolSample", "PoolUpdate", "StorageDtype"]

EvictionPolicy = Literal["oldest", "lowest_quality", "learned", "random"]
StorageDtype = Literal["float32", "float16", "uint8"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "uint8": torch.uint8}
PROVENANCE = {
    "quality": torch.float32,
    "epoch": torch.int64,
    "sample_id": torch.int64,
    "loss": torch.float32,
    "generator": torch.int32,
    "weakness": torch.int32,
    "chunk": torch.int64,  # recipe id, -1 for samples stored as pixels
    "offset": torch.int64,  # index of the sample in its recipe's output
    "source_index": torch.int64,  # the real sample it came from, -1 if none
}
STATE_VERSION = 2


@dataclass(frozen=True)
class PoolUpdate:
    """What one :meth:`SyntheticPool.add` changed.

    Attributes:
        positions: where each stored sample of the batch landed, in batch order (appended first, then
            replaced slots in ascending order).
        appended: positions that did not exist before (the pool grew).
        replaced: positions whose previous sample was evicted, ascending.
        evicted_ids: the ``sample_id`` of each evicted sample, aligned with ``replaced``.
        sample_ids: the ids given to the stored samples, aligned with ``positions``.
        dropped: batch samples not stored because the batch alone exceeded the pool's capacity.
        size: pool length after the update.
    """

    positions: Tensor
    appended: Tensor
    replaced: Tensor
    evicted_ids: Tensor
    sample_ids: Tensor
    dropped: int
    size: int

    @property
    def changed(self) -> Tensor:
        """All positions whose content changed, ascending (reset their loss history)."""
        return torch.sort(self.positions).values


@dataclass(frozen=True)
class PoolSample:
    """One sample with its provenance, as returned by :meth:`SyntheticPool.get`."""

    inputs: Tensor
    target: Tensor
    generator: str
    weakness: str
    quality: float
    epoch: int
    sample_id: int
    loss: float | None


def empty_provenance() -> dict[str, Tensor]:
    return {key: torch.empty(0, dtype=dtype) for key, dtype in PROVENANCE.items()}


def encode(inputs: Tensor, storage_dtype: str) -> Tensor:
    if storage_dtype == "uint8":
        return (inputs.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return inputs.to(DTYPES[storage_dtype])


def decode(inputs: Tensor, storage_dtype: str) -> Tensor:
    if storage_dtype == "uint8":
        return inputs.float() / 255
    return inputs.to(torch.float32, copy=True)


def bytes_per_sample(store: dict[str, Tensor]) -> int:
    return sum(math.prod(values.shape[1:]) * values.element_size() for values in store.values())
