"""Helpers of :class:`~lightning_synth.callbacks.AdaptiveSampling`: where the loader comes from, where its
sampler is, where the logits are."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_synth.data.mapped import mapped_extended
from lightning_synth.data.sampler import AdaptiveSampler

__all__ = ["Pairs", "batch_logits", "batch_tensor", "empty_pairs", "find_sampler", "wrap_train_source"]

Pairs = tuple[Tensor, Tensor, Tensor]  # global draw positions, dataset indices, (loss, score) rows


def wrap_train_source(trainer: pl.Trainer, wrap: Callable[[Any], Any]) -> Callable[[], None]:
    """Make the trainer pass its train DataLoader through ``wrap`` when it requests it; returns the undo.

    The one use of a private Lightning attribute (``trainer.fit_loop._data_source``, Lightning 2.1-2.6,
    pinned by ``tests/callbacks/test_adaptive_sampling.py::test_train_source_hook_supported``): Lightning has
    no public hook to change the loader that ``train_dataloader()`` or ``fit(train_dataloaders=...)`` gave.
    It is only used when the sampler must be installed for you; a loader built with an ``AdaptiveSampler``
    (as :class:`~lightning_synth.SyntheticDataModule` builds it) never needs it.
    """
    source = getattr(trainer.fit_loop, "_data_source", None)
    if source is None or not callable(getattr(source, "dataloader", None)):
        raise RuntimeError(
            "AdaptiveSampling cannot find where this Lightning version requests the train DataLoader "
            "(`trainer.fit_loop._data_source`). Put an `AdaptiveSampler` in your train DataLoader yourself."
        )
    original = source.dataloader
    source.dataloader = lambda: wrap(original())

    def undo() -> None:
        del source.dataloader  # the instance attribute shadowed the class method

    return undo


def find_sampler(loader: DataLoader) -> AdaptiveSampler | None:
    for candidate in (loader.sampler, getattr(loader.batch_sampler, "sampler", None)):
        if isinstance(candidate, AdaptiveSampler):
            return candidate
    return None


def batch_tensor(output: Any, batch_size: int) -> Tensor | None:
    """The first tensor in a forward output whose leading dimension is the batch size."""
    if isinstance(output, Tensor):
        return output if output.ndim >= 1 and output.shape[0] == batch_size else None
    if isinstance(output, Mapping):
        output = [output["logits"]] if "logits" in output else list(output.values())
    if isinstance(output, (list, tuple)):
        for item in output:
            found = batch_tensor(item, batch_size)
            if found is not None:
                return found
    return None


def batch_logits(args: Any, output: Any, batch_size: int) -> Tensor | None:
    """The batch's rows of a forward output: the first tensor whose leading dimension is the batch size, or, when
    the forward ran on the batch followed by views of it (input and output rows a multiple ``k >= 2`` of the batch
    size, as in the consistency recipes' ``self(torch.cat([x, *views]))``), the first ``batch_size`` rows.

    Example:
        >>> x = torch.zeros(4, 3)
        >>> tuple(batch_logits((torch.cat([x, x]),), torch.ones(8, 10), 4).shape)
        (4, 10)
        >>> batch_logits((torch.zeros(4, 7),), torch.ones(28, 10), 4) is None  # 7 tokens per sample, not views
        True
    """
    found = batch_tensor(output, batch_size)
    first = args[0] if isinstance(args, (tuple, list)) and args else None
    rows = first.shape[0] if isinstance(first, Tensor) and first.ndim >= 1 else 0
    if found is not None or batch_size < 1 or rows <= batch_size or rows % batch_size:
        return found
    whole = batch_tensor(output, rows)
    return None if whole is None else whole[:batch_size]


def empty_pairs() -> Pairs:
    return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), torch.empty(0, 2)


class StepRecords:
    """An epoch's per-step ``(positions, indices, values)`` records, written in place into buffers that grow by
    doubling, and read back as :data:`Pairs` with :meth:`take`.

    A record kept as small tensors of its own until the epoch ends sits in the heap between the training
    steps' large, freed blocks and keeps glibc from reusing or returning them (the heap fragments over an
    epoch). Here positions and indices live on a memory map of their own, values on their device (on a GPU
    they stay there: no host sync per step), and each step's tensors are freed with the step.

    Example:
        >>> records = StepRecords()
        >>> records.append(torch.tensor([0, 1]), torch.tensor([7, 3]), torch.ones(2, 2))
        >>> records.append(torch.tensor([2]), torch.tensor([5]), torch.zeros(1, 2))
        >>> pos, idx, values = records.take()
        >>> pos.tolist(), idx.tolist(), values[:, 0].tolist(), len(records)
        ([0, 1, 2], [7, 3, 5], [1.0, 1.0, 0.0], 0)
    """

    def __init__(self) -> None:
        self._pos, self._idx, self._values = empty_pairs()
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def append(self, positions: Tensor, indices: Tensor, values: Tensor) -> None:
        n, end = self._n, self._n + len(positions)
        if end > len(self._pos) or values.device != self._values.device or values.dtype != self._values.dtype:
            capacity = max(end, 2 * len(self._pos), 1024)
            self._pos, self._idx = mapped_extended(self._pos[:n], capacity), mapped_extended(self._idx[:n], capacity)
            kept = self._values[:n].to(values)
            self._values = (mapped_extended(kept, capacity) if values.device.type == "cpu"
                            else torch.cat([kept, kept.new_empty(capacity - n, *kept.shape[1:])]))
        self._pos[n:end], self._idx[n:end], self._values[n:end] = positions, indices, values
        self._n = end

    def take(self) -> Pairs:
        """The records so far, in append order (copies), and an empty buffer (its capacity kept)."""
        n, self._n = self._n, 0
        return self._pos[:n].clone(), self._idx[:n].clone(), self._values[:n].clone()
