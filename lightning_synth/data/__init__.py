"""Data: the synthetic pool, the adaptive sampler, weighting, and the wrapping datamodule."""

from lightning_synth.data.datamodule import SyntheticDataModule
from lightning_synth.data.mixed import MixedDataset
from lightning_synth.data.pool import PoolSample, PoolUpdate, SyntheticPool
from lightning_synth.data.sampler import AdaptiveSampler
from lightning_synth.data.weighting import SyntheticWeighting, allocate_budget

__all__ = [
    "AdaptiveSampler",
    "MixedDataset",
    "PoolSample",
    "PoolUpdate",
    "SyntheticDataModule",
    "SyntheticPool",
    "SyntheticWeighting",
    "allocate_budget",
]
