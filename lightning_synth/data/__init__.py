"""Data: the synthetic pool, the adaptive sampler, weighting, the mixed dataset and the loader rebuild.

Nothing here imports Lightning callbacks. ``SyntheticDataModule`` lives in the Lightning shell
(:mod:`lightning_synth.datamodule`); ``lightning_synth.data.SyntheticDataModule`` still resolves to it.
"""

from typing import Any

from lightning_synth.data.loader import rebuild_loader
from lightning_synth.data.mixed import MixedDataset
from lightning_synth.data.pool import PoolSample, PoolUpdate, SyntheticPool
from lightning_synth.data.sampler import AdaptiveSampler
from lightning_synth.data.weighting import SyntheticWeighting, allocate_budget

__all__ = [
    "AdaptiveSampler",
    "MixedDataset",
    "PoolSample",
    "PoolUpdate",
    "SyntheticPool",
    "SyntheticWeighting",
    "allocate_budget",
    "rebuild_loader",
]


def __getattr__(name: str) -> Any:
    if name == "SyntheticDataModule":  # the old import path; resolved on use, so data/ imports no callback
        from lightning_synth.datamodule import SyntheticDataModule

        return SyntheticDataModule
    raise AttributeError(f"module 'lightning_synth.data' has no attribute {name!r}")
