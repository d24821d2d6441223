"""`SyntheticDataModule`: wraps a user's datamodule; trains on real + synthetic data, adaptively sampled."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from lightning_synth.batch import BatchAdapter, resolve_batch_adapter
from lightning_synth.control import SynthesisController, SynthesisSettings
from lightning_synth.data.mixed import MixedDataset
from lightning_synth.data.pool import SyntheticPool
from lightning_synth.data.sampler import AdaptiveSampler
from lightning_synth.data.weighting import SyntheticWeighting
from lightning_synth.generators.base import SyntheticGenerator

__all__ = ["SyntheticDataModule"]


def _default_generators() -> list[SyntheticGenerator]:
    from lightning_synth.generators.scenario import ScenarioGenerator
    from lightning_synth.generators.targeted import TargetedAugmentation

    return [TargetedAugmentation(), ScenarioGenerator()]


class SyntheticDataModule(L.LightningDataModule):
    """Wraps any ``LightningDataModule``: its train loader draws from real + synthetic data.

    ``prepare_data``, ``setup`` and the val/test/predict loaders pass through untouched. The train loader
    serves the wrapped train set plus a :class:`~lightning_synth.data.pool.SyntheticPool`, drawn by an
    :class:`~lightning_synth.data.sampler.AdaptiveSampler` (same batch size, workers and collate function
    as your loader; the same number of samples per epoch, so the training budget does not change). At each
    refresh the generators make data for the latest :class:`~lightning_synth.profile.WeaknessProfile`;
    synthetic samples come out in the format of your real samples.

    If the trainer has no :class:`~lightning_synth.callbacks.FailureModeCallback` or
    :class:`~lightning_synth.callbacks.AdaptiveSampling`, default ones are added at ``setup``, together with
    the :class:`~lightning_synth.callbacks.SynthesisCallback` that drives the refreshes.

    Args:
        datamodule: your datamodule.
        generators: synthetic-data generators (default: ``TargetedAugmentation`` and ``ScenarioGenerator``).
        synthetic_budget: synthetic samples made per refresh (split across generators and ranks).
        refresh_every_n_epochs: refresh the pool every N epochs.
        max_pool_samples: pool capacity (samples).
        max_pool_bytes: pool capacity (bytes), ``None`` for no byte bound.
        eviction: which samples leave a full pool first.
        real_cache_size: real training samples kept on hand for generators to transform.
        min_generator_share: budget floor per generator when the budget follows sampler mass.
        initial_synthetic_weight: multiplier of the synthetic share before any feedback.
        min_synthetic_weight: lower bound of the synthetic weight.
        max_synthetic_weight: upper bound of the synthetic weight.
        plateau_patience: epochs without progress on synthetic data before the weight is lowered.
        sampler_temperature: temperature of the adaptive sampler (``1e6`` makes it uniform).
        sampler_uniform_mix: share of sampler mass spread uniformly.
        batch_adapter: how to read your samples (see :class:`~lightning_synth.batch.BatchAdapter`).
        seed: seed of generation and sampling.
        serve_api: serve the HTTP control API on global rank 0 while training.
        api_host: interface of the control API.
        api_port: port of the control API (0 picks a free one).
        api_token: bearer token of the control API (generated and printed when ``None``).
        log_images: log image grids of synthetic samples (W&B/TensorBoard) at each refresh.

    Raises:
        TypeError: if ``datamodule`` is not a ``LightningDataModule`` or a generator is not a
            ``SyntheticGenerator``.
        ValueError: if a number is out of range or two generators share a name.

    Example:
        >>> from lightning_synth.datasets import DigitsDataModule
        >>> dm = SyntheticDataModule(DigitsDataModule(), synthetic_budget=256)
        >>> [g.name for g in dm.generators]
        ['targeted', 'scenario']
    """

    def __init__(
        self,
        datamodule: L.LightningDataModule,
        generators: Sequence[SyntheticGenerator] | None = None,
        synthetic_budget: int = 2048,
        refresh_every_n_epochs: int = 1,
        max_pool_samples: int = 20_000,
        max_pool_bytes: int | None = None,
        eviction: Literal["oldest", "lowest_quality", "learned", "random"] = "oldest",
        real_cache_size: int = 8192,
        min_generator_share: float = 0.1,
        initial_synthetic_weight: float = 1.0,
        min_synthetic_weight: float = 0.1,
        max_synthetic_weight: float = 2.0,
        plateau_patience: int = 2,
        sampler_temperature: float = 2.0,
        sampler_uniform_mix: float = 0.2,
        batch_adapter: BatchAdapter | Callable[[Any], Any] | None = None,
        seed: int = 0,
        serve_api: bool = False,
        api_host: str = "127.0.0.1",
        api_port: int = 0,
        api_token: str | None = None,
        log_images: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(datamodule, L.LightningDataModule):
            raise TypeError(f"`datamodule` must be a LightningDataModule, got {type(datamodule).__name__}")
        self.generators = list(_default_generators() if generators is None else generators)
        for g in self.generators:
            if not isinstance(g, SyntheticGenerator):
                raise TypeError(f"`generators` must hold SyntheticGenerator instances, got {type(g).__name__}")
        names = [g.name for g in self.generators]
        if len(set(names)) != len(names):
            raise ValueError(f"`generators` must have unique names, got {names}")
        for name, value, low in (("real_cache_size", real_cache_size, 1), ("api_port", api_port, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}")
        if not 0.0 <= min_generator_share <= 1.0 / max(len(self.generators), 1):
            raise ValueError(f"`min_generator_share` must be in [0, 1/len(generators)], got {min_generator_share}")
        self.datamodule = datamodule
        self.adapter = resolve_batch_adapter(batch_adapter)
        self.pool = SyntheticPool(max_samples=max_pool_samples, max_bytes=max_pool_bytes, eviction=eviction,
                                  seed=seed)
        self.weighting = SyntheticWeighting(base_weight=initial_synthetic_weight, min_weight=min_synthetic_weight,
                                            max_weight=max_synthetic_weight, patience=plateau_patience)
        settings = SynthesisSettings(synthetic_budget=synthetic_budget, refresh_every_n_epochs=refresh_every_n_epochs,
                                     sampler_temperature=sampler_temperature, sampler_uniform_mix=sampler_uniform_mix)
        self.controller = SynthesisController(settings, known_generators=names)
        self.real_cache_size, self.min_generator_share, self.seed = real_cache_size, min_generator_share, seed
        self.serve_api, self.api_host, self.api_port, self.api_token = serve_api, api_host, api_port, api_token
        self.log_images = log_images
        self.sampler: AdaptiveSampler | None = None
        self.mixed: MixedDataset | None = None
        self.server: Any = None
        self.generated: dict[str, int] = {}

    # ----------------------------------------------------------------------------------- pass-through
    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: str) -> None:
        self.datamodule.trainer = self.trainer
        self.datamodule.setup(stage)
        if stage == "fit" and self.trainer is not None:
            from lightning_synth.callbacks.synthesis import SynthesisCallback

            SynthesisCallback.attach(self.trainer, self)

    def teardown(self, stage: str) -> None:
        self.datamodule.teardown(stage)
        if self.server is not None:
            self.server.stop()
            self.server = None

    def val_dataloader(self) -> Any:
        return self.datamodule.val_dataloader()

    def test_dataloader(self) -> Any:
        return self.datamodule.test_dataloader()

    def predict_dataloader(self) -> Any:
        return self.datamodule.predict_dataloader()

    # ------------------------------------------------------------------------------------------ train
    def train_dataloader(self) -> DataLoader:
        base = self.datamodule.train_dataloader()
        if not isinstance(base, DataLoader):
            raise TypeError(
                f"SyntheticDataModule wraps a datamodule whose `train_dataloader()` returns one DataLoader; got "
                f"{type(base).__name__}."
            )
        self.mixed = MixedDataset(base.dataset, self.pool, self.adapter)
        settings = self.controller.settings
        if self.sampler is None:
            self.sampler = AdaptiveSampler(self.mixed, seed=self.seed, num_samples=self.mixed.num_real,
                                           drop_last=base.drop_last, temperature=settings.sampler_temperature,
                                           uniform_mix=settings.sampler_uniform_mix)
        return DataLoader(
            self.mixed, batch_size=base.batch_size, sampler=self.sampler, num_workers=base.num_workers,
            collate_fn=base.collate_fn, pin_memory=base.pin_memory, drop_last=base.drop_last,
            # Workers must see each refresh of the pool: no persistent workers.
            persistent_workers=False,
        )

    def real_cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A seeded sample of real training data as ``(inputs, targets)`` tensors, the same on every rank."""
        if self.mixed is None:
            raise RuntimeError("`real_cache()` needs the train dataloader; call it after `trainer.fit` starts.")
        n = min(self.real_cache_size, self.mixed.num_real)
        index = torch.randperm(self.mixed.num_real, generator=torch.Generator().manual_seed(self.seed))[:n]
        items = [self.mixed.real[int(i)] for i in index]
        view = self.adapter.unpack(torch.utils.data.default_collate(items))
        return view.inputs.float(), view.targets.long()

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "pool": self.pool.state_dict(),
            "weighting": self.weighting.state_dict(),
            "controller": self.controller.state_dict(),
            "generators": {g.name: g.state_dict() for g in self.generators},
            "generated": dict(self.generated),
            "wrapped": self.datamodule.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pool.load_state_dict(state_dict["pool"])
        self.weighting.load_state_dict(state_dict["weighting"])
        self.controller.load_state_dict(state_dict["controller"])
        for g in self.generators:
            if g.name in state_dict["generators"]:
                g.load_state_dict(state_dict["generators"][g.name])
        self.generated = dict(state_dict.get("generated", {}))
        self.datamodule.load_state_dict(state_dict.get("wrapped", {}))

    def start_server(self) -> None:
        """Start the HTTP control API (global rank 0 only); called by the synthesis callback."""
        if not self.serve_api or self.server is not None:
            return
        from lightning_synth.control import ControlServer

        # Assigned only once started: a failed start (port in use) leaves no dead server behind to skip a retry.
        server = ControlServer(self.controller, host=self.api_host, port=self.api_port, token=self.api_token)
        self.server = server.start()
        rank_zero_info(f"lightning_synth control API at {self.server.url}")
