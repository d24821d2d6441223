"""`SyntheticDataModule` and `attach`: the Lightning shell around a :class:`~lightning_synth.engine.SynthesisEngine`.

The datamodule builds the train loader (the user's loader, rebuilt once with the real + synthetic dataset and
the adaptive sampler, every other DataLoader argument kept) and wires the callbacks with explicit references
at ``setup``: the user's :class:`~lightning_synth.callbacks.FailureModeCallback` and
:class:`~lightning_synth.callbacks.AdaptiveSampling` if the trainer has them (default ones otherwise) and a
:class:`~lightning_synth.callbacks.SynthesisCallback` driving the engine.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_synth._validation import check_bool
from lightning_synth.batch import BatchAdapter, resolve_batch_adapter
from lightning_synth.callbacks import AdaptiveSampling, FailureModeCallback, SynthesisCallback
from lightning_synth.control import SynthesisController
from lightning_synth.data.loader import rebuild_loader
from lightning_synth.data.mixed import MixedDataset
from lightning_synth.data.pool import StorageDtype, SyntheticPool
from lightning_synth.data.sampler import AdaptiveSampler
from lightning_synth.data.weighting import SyntheticWeighting
from lightning_synth.engine import SynthesisEngine
from lightning_synth.generators.base import SyntheticGenerator

__all__ = ["SyntheticDataModule", "attach"]


class SyntheticDataModule(L.LightningDataModule):
    """Wraps any ``LightningDataModule``: its train loader draws from real + synthetic data.

    ``prepare_data``, ``setup`` and the val/test/predict loaders pass through untouched (a datamodule without
    one of them stays without it). The train loader is your loader with the dataset replaced by real +
    synthetic samples and an :class:`~lightning_synth.data.sampler.AdaptiveSampler` (same batch size, workers,
    collate function, ``worker_init_fn``, ``generator``...; the same number of samples per epoch). Synthetic
    samples come out in the format, value range and dtype of your real samples.

    If the trainer has no :class:`~lightning_synth.callbacks.FailureModeCallback` or
    :class:`~lightning_synth.callbacks.AdaptiveSampling`, default ones are added at ``setup``, together with
    the :class:`~lightning_synth.callbacks.SynthesisCallback` that drives the refreshes.

    Args:
        datamodule: your datamodule.
        generators: synthetic-data generators (default: ``TargetedAugmentation()``; add ``ScenarioGenerator`` for
            compound perturbations, confusion compositions and your slice scenarios, or a GAN).
        synthetic_budget: samples made per refresh: an int, or a float in (0, 1], that fraction of your
            training set bounded to [256, 50_000].
        refresh_every_n_epochs: refresh the pool every N epochs.
        max_pool_samples: pool capacity (samples); ``None``: twice the budget.
        max_pool_bytes: pool capacity (bytes of the in-memory pixel cache), ``None`` for no byte bound.
        eviction: which samples leave a full pool first.
        real_cache_size: real training samples kept on hand for generators to transform.
        pool_storage_dtype: how the pool keeps its pixels in RAM (``"uint8"``: a quarter of float32's memory,
            within 0.5/255 of the generated value; ``"float32"`` exact).
        min_generator_share: budget floor per generator when the budget follows sampler mass.
        initial_synthetic_weight: multiplier of the synthetic share before any feedback (0.75: chosen on
            the robustness benchmark's validation corruptions).
        min_synthetic_weight: lower bound of the synthetic weight.
        max_synthetic_weight: upper bound of the synthetic weight.
        plateau_patience: epochs without progress on synthetic data before the weight is lowered.
        sampler_temperature: temperature of the adaptive sampler (``1e6`` makes it uniform).
        sampler_uniform_mix: share of sampler mass spread uniformly (default 0.2: the rest follows each
            sample's loss; 1 draws uniformly; see :class:`~lightning_synth.engine.SynthesisEngine`).
        batch_adapter: how to read your samples (see :class:`~lightning_synth.batch.BatchAdapter`).
        seed: seed of generation and sampling.
        serve_api: serve the HTTP control API on global rank 0 while training.
        api_host: interface of the control API.
        api_port: port of the control API (0 picks a free one).
        api_token: bearer token of the control API (generated and printed when ``None``).
        log_images: log image grids of synthetic samples (W&B/TensorBoard) at each refresh.
        deliver_source: each training sample also carries the input of the real sample it was made from (a
            real sample's own input), for a consistency objective between the two (README "Consistency with the
            real source"): a dict sample gains the key ``"source"``, a tuple one more element at its end.

    Raises:
        TypeError: if ``datamodule`` is not a ``LightningDataModule`` or an argument has the wrong type.
        ValueError: if a number is out of range or two generators share a name.

    Example:
        >>> from lightning_synth.datasets import DigitsDataModule
        >>> dm = SyntheticDataModule(DigitsDataModule(), synthetic_budget=256)
        >>> [g.name for g in dm.generators]
        ['targeted']
    """

    def __init__(
        self,
        datamodule: L.LightningDataModule,
        generators: Sequence[SyntheticGenerator] | None = None,
        synthetic_budget: int | float = 1 / 3,
        refresh_every_n_epochs: int = 1,
        max_pool_samples: int | None = None,
        max_pool_bytes: int | None = None,
        eviction: Literal["oldest", "lowest_quality", "learned", "random"] = "oldest",
        real_cache_size: int = 8192,
        pool_storage_dtype: StorageDtype = "uint8",
        min_generator_share: float = 0.1,
        initial_synthetic_weight: float = 0.75,
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
        deliver_source: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(datamodule, L.LightningDataModule):
            raise TypeError(f"`datamodule` must be a LightningDataModule, got {type(datamodule).__name__}")
        check_bool("deliver_source", deliver_source)
        self.deliver_source = deliver_source
        self.datamodule = datamodule
        self.engine = SynthesisEngine(
            generators, synthetic_budget=synthetic_budget, max_pool_samples=max_pool_samples,
            max_pool_bytes=max_pool_bytes, eviction=eviction, real_cache_size=real_cache_size,
            pool_storage_dtype=pool_storage_dtype,
            min_generator_share=min_generator_share, initial_synthetic_weight=initial_synthetic_weight,
            min_synthetic_weight=min_synthetic_weight, max_synthetic_weight=max_synthetic_weight,
            plateau_patience=plateau_patience, refresh_every_n_epochs=refresh_every_n_epochs,
            sampler_temperature=sampler_temperature, sampler_uniform_mix=sampler_uniform_mix, seed=seed,
        )
        self.adapter = resolve_batch_adapter(batch_adapter)
        self.seed = seed
        self.api: dict[str, Any] = {"serve_api": serve_api, "api_host": api_host, "api_port": api_port,
                                    "api_token": api_token}
        self.log_images = log_images
        self.mixed: MixedDataset | None = None
        self.synthesis: SynthesisCallback | None = None  # set when the callbacks are made (attach or setup)
        # Lightning calls a datamodule's loader hooks only when they are overridden: mirror the wrapped one's.
        for stage in ("val", "test", "predict"):
            name = f"{stage}_dataloader"
            if not _overrides(datamodule, name):
                setattr(self, name, getattr(L.LightningDataModule, name).__get__(self))

    # ------------------------------------------------------------------------------------------ views
    @property
    def generators(self) -> list[SyntheticGenerator]:
        return self.engine.generators

    @property
    def pool(self) -> SyntheticPool:
        return self.engine.pool

    @property
    def weighting(self) -> SyntheticWeighting:
        return self.engine.weighting

    @property
    def controller(self) -> SynthesisController:
        return self.engine.controller

    @property
    def sampler(self) -> AdaptiveSampler | None:
        return self.engine.sampler

    @property
    def generated(self) -> dict[str, int]:
        return self.engine.generated

    @property
    def server(self) -> Any:
        """The running control API server (global rank 0, while fitting with ``serve_api=True``), else ``None``."""
        return self.synthesis.server if self.synthesis is not None else None

    # ----------------------------------------------------------------------------------- pass-through
    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: str) -> None:
        self.datamodule.trainer = self.trainer
        self.datamodule.setup(stage)
        if stage == "fit" and self.trainer is not None:
            _wire(self.trainer, self)

    def teardown(self, stage: str) -> None:
        self.datamodule.teardown(stage)

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
        if self.mixed is None or self.mixed.real is not base.dataset:
            self.mixed = MixedDataset(base.dataset, self.engine.pool, self.adapter, deliver_source=self.deliver_source)
        mixed, engine = self.mixed, self.engine
        sampler = engine.sampler
        if sampler is None or sampler.dataset is not mixed:
            settings = engine.controller.settings
            sampler = AdaptiveSampler(mixed, seed=self.seed, num_samples=mixed.num_real, drop_last=base.drop_last,
                                      temperature=settings.sampler_temperature,
                                      uniform_mix=settings.sampler_uniform_mix)
        engine.bind(mixed.num_real, self._real_sample, sampler)
        mixed.value_range = engine.real.value_range
        if base.num_workers > 0 and base.persistent_workers:
            warnings.warn("SyntheticDataModule turns off `persistent_workers`: workers must see each refresh of "
                          "the synthetic pool.", stacklevel=2)
            base.persistent_workers = False
        return rebuild_loader(base, sampler, mixed, reason="SyntheticDataModule")

    def real_cache(self) -> tuple[Tensor, Tensor]:
        """The seeded sample of real training data generators transform, as ``(inputs in [0, 1], targets)``."""
        return self.engine.real.inputs, self.engine.real.targets

    def _real_sample(self, index: Tensor) -> tuple[Tensor, Tensor]:
        assert self.mixed is not None
        items = [self.mixed.real[int(i)] for i in index]
        view = self.adapter.unpack(torch.utils.data.default_collate(items))
        return view.inputs, view.targets

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"engine": self.engine.state_dict(), "wrapped": self.datamodule.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.engine.load_state_dict(state_dict["engine"])
        self.datamodule.load_state_dict(state_dict.get("wrapped", {}))


def _overrides(datamodule: L.LightningDataModule, name: str) -> bool:
    return getattr(type(datamodule), name) is not getattr(L.LightningDataModule, name)


def _callbacks_for(dm: SyntheticDataModule, analyzer: FailureModeCallback | None,
                   sampling: AdaptiveSampling | None) -> list[Any]:
    analyzer = analyzer or FailureModeCallback(batch_adapter=dm.adapter)
    sampling = sampling or AdaptiveSampling(batch_adapter=dm.adapter)
    synthesis = SynthesisCallback(dm.engine, analyzer=analyzer, sampling=sampling, log_images=dm.log_images,
                                  **dm.api)
    dm.synthesis = synthesis
    return [analyzer, sampling, synthesis]


def _wire(trainer: L.Trainer, dm: SyntheticDataModule) -> None:
    """Add the callbacks ``dm`` needs, reusing the trainer's analyzer and sampling callbacks (once, at setup)."""
    callbacks: list[Any] = trainer.callbacks  # type: ignore[attr-defined]
    if any(isinstance(c, SynthesisCallback) and c.engine is dm.engine for c in callbacks):
        return  # wired by `attach`, or by an earlier fit
    analyzer = next((c for c in callbacks if isinstance(c, FailureModeCallback)), None)
    sampling = next((c for c in callbacks if isinstance(c, AdaptiveSampling)), None)
    callbacks.extend(c for c in _callbacks_for(dm, analyzer, sampling) if c not in callbacks)


def attach(datamodule: L.LightningDataModule, **kwargs: Any) -> tuple[SyntheticDataModule, list[Any]]:
    """Wrap ``datamodule`` and return it with the callbacks that drive it: ``Trainer(callbacks=callbacks)``.

    ``kwargs`` are :class:`SyntheticDataModule`'s arguments.

    Example:
        >>> from lightning_synth.datasets import DigitsDataModule
        >>> dm, callbacks = attach(DigitsDataModule(), synthetic_budget=0.25)
        >>> [type(c).__name__ for c in callbacks]
        ['FailureModeCallback', 'AdaptiveSampling', 'SynthesisCallback']
    """
    dm = SyntheticDataModule(datamodule, **kwargs)
    return dm, _callbacks_for(dm, None, None)
