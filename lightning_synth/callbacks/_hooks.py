"""Helpers of :class:`~lightning_synth.callbacks.AdaptiveSampling`: where the loader comes from, where its
sampler is, where the logits are."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_synth.data.sampler import AdaptiveSampler

__all__ = ["Pairs", "batch_tensor", "empty_pairs", "find_sampler", "wrap_train_source"]

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


def empty_pairs() -> Pairs:
    return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), torch.empty(0, 2)
