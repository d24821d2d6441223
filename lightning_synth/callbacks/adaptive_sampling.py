"""Feed each sample's training loss back into an :class:`~lightning_synth.data.sampler.AdaptiveSampler`.

The callback adds no forward pass: it reads the logits the training step already computes (a forward hook on
the LightningModule, or on ``capture_module``), or per-sample losses that ``training_step`` returns under
``"per_sample_loss"``. Batch rows are matched to dataset indices through the sampler's own order, so the
user's batch format is untouched. Losses are gathered across ranks and applied at epoch end, in the order of
the global draw, so every rank ends the epoch with the same weights.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerStatus
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader
from typing_extensions import override

from lightning_synth.batch import BatchAdapter, resolve_batch_adapter
from lightning_synth.callbacks._hooks import (
    Pairs,
    StepRecords,
    batch_logits,
    empty_pairs,
    find_sampler,
    wrap_train_source,
)
from lightning_synth.data.loader import rebuild_loader
from lightning_synth.data.sampler import AdaptiveSampler
from lightning_synth.engine.comm import StrategyComm
from lightning_synth.irreducible import IrreducibleLoss

__all__ = ["PER_SAMPLE_LOSS_KEY", "AdaptiveSampling"]

PER_SAMPLE_LOSS_KEY = "per_sample_loss"


class AdaptiveSampling(Callback):
    """Samples hard examples more often: per-sample training losses drive an :class:`AdaptiveSampler`.

    If the train DataLoader has no ``AdaptiveSampler``, one is installed for you (``install_sampler=True``):
    the DataLoader that ``train_dataloader()`` returns (or that was passed to ``fit``) is rebuilt with the
    sampler, keeping every other DataLoader argument. If it already has one (as
    :class:`~lightning_synth.SyntheticDataModule` builds it), that sampler is used: set its temperature there.
    The sampler's state rides in this callback's checkpoint state.

    Args:
        temperature: temperature of a sampler this callback installs (default 2); see :class:`AdaptiveSampler`.
            Given while the loader already has a sampler, it is an error.
        uniform_mix: share of probability mass spread uniformly by a sampler this callback installs
            (default 0.2).
        ema_decay: weight of a sample's old score when a new epoch's loss arrives.
        prior: score of never-seen samples, ``"mean"`` or ``"max"`` of the seen scores.
        num_samples: indices drawn per epoch over all ranks (default: the dataset length).
        seed: sampler seed (default: the ``seed_everything`` seed, else 0).
        batch_adapter: how to read targets from a batch
            (see :func:`lightning_synth.batch.resolve_batch_adapter`).
        loss_fn: ``(logits, targets) -> per-sample losses``; default cross-entropy with ``reduction="none"``.
        capture_module: dotted name of the submodule whose forward output holds the logits, when
            ``training_step`` does not call ``self(...)``; default the LightningModule itself.
        normalize: ``"batch"`` divides each loss by its batch's mean loss before it reaches the sampler, so a
            score says how hard a sample is *relative to the model at the time* and not how early in training
            it was seen (raw losses of an epoch fall as the model learns); ``"none"`` passes raw losses.
        install_sampler: rebuild the train DataLoader with an ``AdaptiveSampler`` when it has none;
            if False such a DataLoader is an error.
        log_stats: log :meth:`AdaptiveSampler.stats` as ``adaptive_sampling/<key>`` at each epoch end.
        irreducible: reducible-loss sampling (RHO-LOSS): trained on the datamodule's ``val_dataloader()`` at fit
            start; a score is then the loss *minus* the sample's loss under it (see :class:`IrreducibleLoss`).

    Attributes:
        sampler: the :class:`AdaptiveSampler` in use (``None`` before ``fit``).
        last_update: what the last epoch end applied, in global draw order and identical on every rank:
            ``indices``, raw ``losses`` and the ``scores`` fed to :meth:`AdaptiveSampler.update`.

    Raises:
        ValueError: if an argument is out of range.
        TypeError: if ``batch_adapter`` or ``loss_fn`` has the wrong type.

    Example:
        >>> import lightning as L
        >>> callback = AdaptiveSampling(temperature=2.0, uniform_mix=0.2)
        >>> trainer = L.Trainer(callbacks=[callback], logger=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        temperature: float | None = None,
        uniform_mix: float | None = None,
        ema_decay: float = 0.5,
        prior: Literal["mean", "max"] = "mean",
        num_samples: int | None = None,
        seed: int | None = None,
        batch_adapter: BatchAdapter | Callable[[Any], Any] | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        capture_module: str | None = None,
        normalize: Literal["batch", "none"] = "batch",
        install_sampler: bool = True,
        log_stats: bool = True,
        irreducible: IrreducibleLoss | None = None,
    ) -> None:
        AdaptiveSampler._check_config(2.0 if temperature is None else temperature,
                                      0.2 if uniform_mix is None else uniform_mix, ema_decay, prior, "systematic")
        bad_count = isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1
        if num_samples is not None and bad_count:
            raise ValueError(f"`num_samples` must be an integer >= 1 or None, got {num_samples!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"`seed` must be an integer or None, got {seed!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be a callable (logits, targets) -> losses or None, got {loss_fn!r}")
        if normalize not in ("batch", "none"):
            raise ValueError(f"`normalize` must be 'batch' or 'none', got {normalize!r}")
        if irreducible is not None and not isinstance(irreducible, IrreducibleLoss):
            raise TypeError(f"`irreducible` must be an IrreducibleLoss or None, got {type(irreducible).__name__}")
        if capture_module is not None and (not isinstance(capture_module, str) or not capture_module):
            raise ValueError(f"`capture_module` must be a non-empty submodule name or None, got {capture_module!r}")
        self.sampler_kwargs: dict[str, Any] = {"temperature": 2.0 if temperature is None else temperature,
                                               "uniform_mix": 0.2 if uniform_mix is None else uniform_mix,
                                               "ema_decay": ema_decay, "prior": prior, "num_samples": num_samples}
        self._explicit = [n for n, v in (("temperature", temperature), ("uniform_mix", uniform_mix)) if v is not None]
        self.seed, self.batch_adapter = seed, resolve_batch_adapter(batch_adapter)
        self.loss_fn, self.capture_module, self.normalize = loss_fn, capture_module, normalize
        self.install_sampler, self.log_stats, self.irreducible = bool(install_sampler), bool(log_stats), irreducible
        self.sampler: AdaptiveSampler | None = None
        self.last_update: dict[str, Tensor] = {}
        self._trainer: pl.Trainer | None = None
        self._in_fit = self._capturing = False
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._undo_source: Callable[[], None] | None = None
        self._listeners: list[Callable[[Tensor, Tensor], None]] = []
        self._batch_size = self._batches_seen = 0
        self._rows = self._positions = torch.empty(0, dtype=torch.long)
        self._captured: Tensor | None = None
        self._local = StepRecords()  # this rank's records of the epoch, until the gather
        self._gathered: list[Pairs] = []
        self._sampler_state_to_load: dict[str, Any] | None = None
        self._warned: set[str] = set()

    # ----------------------------------------------------------------------------------------- wiring
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer
        self._hook = self._capture_target(pl_module).register_forward_hook(self._capture)
        self._undo_source = wrap_train_source(trainer, lambda loader: self._prepare_loader(loader, trainer))

    def add_listener(self, listener: Callable[[Tensor, Tensor], None]) -> None:
        """Call ``listener(indices, losses)`` at each epoch end with the epoch's per-sample losses (global draw
        order, identical on every rank), e.g. ``SynthesisEngine.observe``."""
        if listener not in self._listeners:
            self._listeners.append(listener)

    def _capture_target(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.capture_module is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.capture_module)
        except AttributeError as err:
            names = [name for name, _ in pl_module.named_children()]
            raise ValueError(
                f"`capture_module` must name a submodule of {type(pl_module).__name__}, got "
                f"{self.capture_module!r}; top-level submodules: {names}"
            ) from err

    def _unwire(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._undo_source is not None:
            self._undo_source()
            self._undo_source = None
        self._in_fit = False

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unwire()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._unwire()

    def _prepare_loader(self, loader: Any, trainer: pl.Trainer) -> Any:
        """Find or install the sampler in the train DataLoader, restore its state and epoch."""
        if not isinstance(loader, DataLoader):
            raise TypeError(
                "AdaptiveSampling needs `train_dataloader()` to return one torch DataLoader, got "
                f"{type(loader).__name__}. Combine several datasets into one Dataset instead."
            )
        sampler = find_sampler(loader)
        if sampler is not None and self._explicit and sampler is not self.sampler:
            raise ValueError(
                f"AdaptiveSampling({', '.join(self._explicit)}=...) would be ignored: the train DataLoader already "
                "has an AdaptiveSampler (e.g. built by SyntheticDataModule); set them there (`sampler_temperature=`, "
                "`sampler_uniform_mix=`)."
            )
        if sampler is None:
            loader, sampler = self._install(loader, trainer)
        elif self.sampler is not None and sampler is not self.sampler:
            sampler.load_state_dict(self.sampler.state_dict())  # a reloaded loader keeps the learned weights
        if self._sampler_state_to_load is not None:
            sampler.load_state_dict(self._sampler_state_to_load)
            self._sampler_state_to_load = None
        # with workers the first draw happens before Lightning's set_epoch: set the epoch it is about to set
        sampler.set_epoch(trainer.fit_loop.epoch_progress.current.processed)  # type: ignore[attr-defined]
        self.sampler = sampler
        return loader

    def _install(self, loader: DataLoader, trainer: pl.Trainer) -> tuple[DataLoader, AdaptiveSampler]:
        if not self.install_sampler:
            raise RuntimeError(
                "The train DataLoader has no AdaptiveSampler and `AdaptiveSampling(install_sampler=False)`. "
                "Build it with `DataLoader(dataset, batch_size=..., sampler=AdaptiveSampler(dataset))` or "
                "set `install_sampler=True`."
            )
        sampler = self.sampler
        if sampler is None:
            seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
            sampler = AdaptiveSampler(
                loader.dataset,  # type: ignore[arg-type]
                num_replicas=trainer.world_size,
                rank=trainer.global_rank,
                seed=seed,
                **self.sampler_kwargs,  # type: ignore[arg-type]
            )
        else:  # a reloaded loader, or this callback reused for another fit: keep the learned weights
            sampler.dataset = loader.dataset  # type: ignore[assignment]
            sampler.num_replicas, sampler.rank = trainer.world_size, trainer.global_rank
        return rebuild_loader(loader, sampler, reason="AdaptiveSampling"), sampler

    def _bind_loader(self, trainer: pl.Trainer) -> None:
        """Read the sampler and batch size from the DataLoader Lightning actually iterates."""
        loader = trainer.train_dataloader
        sampler = find_sampler(loader) if isinstance(loader, DataLoader) else None
        batch_sampler = getattr(loader, "batch_sampler", None)
        if sampler is None or not isinstance(batch_sampler, BatchSampler):
            raise RuntimeError(
                "AdaptiveSampling found no AdaptiveSampler in the train DataLoader Lightning uses "
                f"({type(loader).__name__}). Something (e.g. `overfit_batches` or a custom batch sampler) "
                "replaced it; use a DataLoader with `batch_size=` and `sampler=AdaptiveSampler(...)`."
            )
        self.sampler, self._batch_size, self._batches_seen = sampler, int(batch_sampler.batch_size), 0

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bind_loader(trainer)
        self._in_fit = True
        if self.irreducible is not None and not self.irreducible.fitted:
            held_out = trainer.datamodule  # type: ignore[attr-defined]
            self.irreducible.fit_heldout(self._capture_target(pl_module), held_out, self.batch_adapter)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._in_fit = False

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bind_loader(trainer)

    # ----------------------------------------------------------------------------------------- per batch
    def _capture(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._capturing and self._captured is None:
            found = batch_logits(args, output, self._rows.numel())
            if found is not None:
                self._captured = found.detach()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        assert self.sampler is not None
        # batch k of this rank's epoch covers epoch_indices[k*B:(k+1)*B]; count batches rather than trust
        # `batch_idx`, which keeps counting after a mid-epoch resume while the iterator starts over
        start = self._batches_seen * self._batch_size
        self._rows = self.sampler.epoch_indices[start : start + self._batch_size]
        local_positions = torch.arange(start, start + self._rows.numel())
        self._positions = local_positions * self.sampler.num_replicas + self.sampler.rank
        self._batches_seen += 1
        self._captured, self._capturing = None, True

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._capturing = False
        losses = self._per_sample_losses(outputs, batch)
        self._captured = None
        if losses is None:
            return
        if losses.numel() != self._rows.numel():
            self._warn_once(
                "size",
                f"AdaptiveSampling: batch {batch_idx} gave {losses.numel()} per-sample losses but the "
                f"sampler yielded {self._rows.numel()} indices for it; skipping it. Is the batch filtered or "
                "resized before the training step?",
            )
            return
        losses = losses.detach().float().reshape(-1)
        reducible = losses if self.irreducible is None or self.sampler is None else self.irreducible.subtract(
            self._capture_target(pl_module), losses, self.batch_adapter.unpack(batch), self.sampler.irreducible_losses,
            self._rows)
        scores = self._scores(losses, reducible)
        self._local.append(self._positions, self._rows, torch.stack([losses, scores], 1))

    def _scores(self, losses: Tensor, reducible: Tensor) -> Tensor:
        if self.normalize == "none":
            return reducible
        finite = torch.isfinite(losses)  # stays on the device: no host sync per step
        mean = torch.where(finite, losses, 0.0).sum() / finite.sum().clamp_min(1)
        return reducible / mean.clamp_min(1e-12)

    @torch.no_grad()
    def _per_sample_losses(self, outputs: Any, batch: Any) -> Tensor | None:
        if isinstance(outputs, Mapping) and outputs.get(PER_SAMPLE_LOSS_KEY) is not None:
            losses = torch.as_tensor(outputs[PER_SAMPLE_LOSS_KEY])
            return losses.reshape(losses.shape[0], -1).float().mean(1) if losses.ndim > 1 else losses.reshape(-1)
        if self._captured is None:
            self._warn_once(
                "capture",
                "AdaptiveSampling saw no per-sample losses: `training_step` returned no 'per_sample_loss' "
                f"and no forward output had the batch's {self._rows.numel()} rows. Call `self(x)` in "
                "`training_step`, set `capture_module=` to the submodule that computes the logits, or return "
                "{'loss': loss, 'per_sample_loss': losses}. Sampling weights are not updated for these "
                "batches.",
            )
            return None
        targets = self.batch_adapter.unpack(batch).targets.to(self._captured.device)
        logits = self._captured.float()
        try:
            losses = (
                self.loss_fn(logits, targets) if self.loss_fn else F.cross_entropy(logits, targets, reduction="none")
            )
        except (RuntimeError, ValueError, IndexError) as err:
            raise RuntimeError(
                f"AdaptiveSampling could not compute per-sample losses from logits {tuple(logits.shape)} and "
                f"targets {tuple(targets.shape)}: {err}. Pass `loss_fn=` or return 'per_sample_loss' from "
                "training_step."
            ) from err
        return losses.reshape(losses.shape[0], -1).mean(1) if losses.ndim > 1 else losses

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=2)

    # ----------------------------------------------------------------------------------------- epoch end
    def _sync(self) -> None:
        """Move this rank's buffered pairs into the gathered buffer, identical on every rank (collective)."""
        pos, idx, values = self._local.take()
        if (trainer := self._trainer) is None or trainer.world_size == 1:
            self._gathered += [(pos, idx, values.cpu())] if pos.numel() else []
            return
        comm = StrategyComm(trainer.strategy)
        keys = comm.gather_uneven(torch.stack([pos, idx], 1)).cpu()
        values = comm.gather_uneven(values).cpu()
        self._gathered += [(keys[:, 0], keys[:, 1], values)] if keys.numel() else []

    def _pending(self) -> Pairs:
        """Gathered pairs in global draw order, whatever sync rounds they arrived in."""
        gathered = self._gathered
        pos, idx, values = (torch.cat(p) for p in zip(*gathered, strict=True)) if gathered else empty_pairs()
        order = torch.sort(pos, stable=True).indices
        return pos[order], idx[order], values[order]

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.sampler is not None
        self._sync()
        _, idx, values = self._pending()
        self._gathered = []
        with warnings.catch_warnings():
            if trainer.global_rank != 0:
                warnings.simplefilter("ignore", RuntimeWarning)  # every rank sees the same NaNs; warn once
            self.sampler.update(idx, values[:, 1])
        self.last_update = {"indices": idx, "losses": values[:, 0], "scores": values[:, 1]}
        for listener in self._listeners:
            listener(idx, values[:, 0])
        if self.log_stats:
            stats = {f"adaptive_sampling/{key}": value for key, value in self.sampler.stats().items()}
            # identical on every rank; syncing only silences Lightning's epoch-level DDP logging warning
            pl_module.log_dict(stats, on_step=False, on_epoch=True, sync_dist=trainer.world_size > 1)

    # ----------------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        """Sampler state plus the epoch's gathered, not yet applied losses.

        During ``fit`` with several processes this gathers the ranks' buffers, so like
        ``Trainer.save_checkpoint`` it must run on every rank (Lightning does so).
        """
        trainer = self._trainer
        if self._in_fit and trainer is not None and trainer.state.status == TrainerStatus.RUNNING:
            self._sync()  # not while handling an exception: the other ranks may not be there to gather
        pos, idx, values = self._pending()
        sampler_state = self.sampler.state_dict() if self.sampler is not None else self._sampler_state_to_load
        irreducible = self.irreducible.state_dict() if self.irreducible is not None else None
        return {"version": 1, "sampler": sampler_state, "irreducible": irreducible,
                "pending": {"positions": pos, "indices": idx, "values": values}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = {"sampler", "pending"} - set(state_dict)
        if missing:
            raise KeyError(f"AdaptiveSampling state is missing {sorted(missing)}; keys present: {sorted(state_dict)}")
        pending = state_dict["pending"]
        pairs = (pending["positions"], pending["indices"], pending["values"])
        self._gathered = [pairs] if pairs[0].numel() else []
        self._local = StepRecords()
        if self.irreducible is not None and state_dict.get("irreducible") is not None:
            self.irreducible.load_state_dict(state_dict["irreducible"])
        if state_dict["sampler"] is not None and self.sampler is not None:
            self.sampler.load_state_dict(state_dict["sampler"])
        else:
            self._sampler_state_to_load = state_dict["sampler"]
