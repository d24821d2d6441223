"""The one way lightning_synth rebuilds a user's DataLoader: same arguments, another dataset and sampler."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, Sampler

__all__ = ["rebuild_loader"]

# DataLoader arguments copied from the user's loader as they are (sampler/dataset/batching are replaced).
_COPIED = ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn", "multiprocessing_context",
           "generator", "prefetch_factor", "persistent_workers", "pin_memory_device", "in_order")


def rebuild_loader(loader: DataLoader, sampler: Sampler, dataset: Dataset | None = None,
                   reason: str = "lightning_synth") -> DataLoader:
    """``loader`` with ``sampler`` (and ``dataset``) instead of its own, every other argument kept.

    Batch size and ``drop_last`` are kept; so are ``worker_init_fn``, ``generator``, ``prefetch_factor``,
    ``persistent_workers``, ``pin_memory_device`` and the rest. A DataLoader subclass is rebuilt as a plain
    ``DataLoader`` (with a warning): its own ``__init__`` arguments cannot be known.

    Raises:
        TypeError: if ``loader`` is not a DataLoader over a map-style dataset with ``batch_size=`` batching.

    Example:
        >>> import torch
        >>> from torch.utils.data import SequentialSampler, TensorDataset
        >>> data = TensorDataset(torch.arange(4))
        >>> g = torch.Generator()
        >>> new = rebuild_loader(DataLoader(data, batch_size=2, generator=g), SequentialSampler(data))
        >>> new.batch_size, new.generator is g
        (2, True)
    """
    if not isinstance(loader, DataLoader):
        raise TypeError(f"`loader` must be a torch DataLoader, got {type(loader).__name__}")
    if isinstance(loader.dataset, IterableDataset) or type(loader.batch_sampler) is not BatchSampler:
        raise TypeError(
            f"{reason} can only put its sampler in a DataLoader over a map-style dataset with `batch_size=` "
            f"batching, got dataset {type(loader.dataset).__name__} and batch sampler "
            f"{type(loader.batch_sampler).__name__}."
        )
    if type(loader) is not DataLoader:
        warnings.warn(f"{reason} rebuilds your {type(loader).__name__} as a plain DataLoader with the same "
                      "arguments; put the sampler in it yourself to keep the subclass.", stacklevel=2)
    accepted = inspect.signature(DataLoader.__init__).parameters
    kwargs: dict[str, Any] = {name: getattr(loader, name) for name in _COPIED
                              if name in accepted and hasattr(loader, name)}
    if loader.num_workers == 0:  # DataLoader rejects these without workers
        kwargs.pop("prefetch_factor", None)
        kwargs["persistent_workers"] = False
    return DataLoader(dataset if dataset is not None else loader.dataset, batch_size=loader.batch_size,
                      sampler=sampler, drop_last=loader.drop_last, **kwargs)
