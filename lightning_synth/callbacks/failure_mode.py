"""`FailureModeCallback`: measures how the model fails, by type, at the end of validation."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassRecall
from torchmetrics.wrappers import ClasswiseWrapper
from typing_extensions import override

from lightning_synth._validation import check_bool, check_int
from lightning_synth.analysis import GroupAccuracy, build_profile
from lightning_synth.batch import BatchAdapter, BatchView, resolve_batch_adapter
from lightning_synth.callbacks._validation_hooks import (  # the underscored ones: old import paths
    LogitsFn,
    LogitsTap,
    PaddingFilter,
    ProbeLayout,
    _default_logits,
    _first_val_loader,
    _has_val_loop,
    _padded_dataset_len,
    gathered_value_range,
    is_image_batch,
    profile_metrics,
)
from lightning_synth.callbacks._validation_hooks import _as_class_logits as _as_class_logits  # old import path
from lightning_synth.logging import log_profile_pictures, log_table, write_json_artifact
from lightning_synth.perturbations import PerturbationBank
from lightning_synth.probing import PerturbationProber
from lightning_synth.profile import WeaknessProfile
from lightning_synth.value_range import ValueRange

__all__ = ["FailureModeCallback"]

SliceFn = Callable[[Any], dict[str, Tensor]]


class FailureModeCallback(Callback):
    """Builds a :class:`~lightning_synth.profile.WeaknessProfile` at the end of validation.

    Per class and the most confused class pairs (from the clean predictions the validation loop already
    makes), per perturbation of the shared bank at each severity (on a bounded subset), and per slice
    (batch attributes or ``slice_fn``). All counts are torchmetrics states, so under DDP every rank ends
    with the same profile, equal to a single-process run on the same data (padding samples that the
    distributed sampler repeats are counted once).

    Probing costs a fraction of a full sweep (perturbations x severities x ``max_samples``):

    - **Where it matters.** After the first analysis, only severities around each perturbation's last
      failure frontier (one level below and above) and the third of the cells with the largest last gaps
      (the leading weaknesses) are probed; the other cells keep their last measurement. A full sweep runs
      every ``full_sweep_every`` analyses and after a frontier moved by more than a level.
    - **Sequential.** The probe budget is spent in stages (1/4, 5/8, all of ``max_samples``); a cell
      settles once the confidence interval of its gap (paired with the clean predictions of the same
      samples) lies on one side of ``frontier_threshold``. A cell settled below stops at a quarter, unless
      it brackets the frontier; one settled above (a leading weakness) is measured on 5/8 of the budget, so
      that the ranking is not read off a few shared samples; unsettled cells that may hold the frontier run
      the whole budget. Stage decisions use counts summed over ranks, so every rank decides alike.
    - **Batched.** Per validation batch, every active cell's perturbed copies are concatenated and scored
      in forwards of ``probe_batch_size``; per-sample parameters come from counter-based hashing of (seed,
      sample index), drawn in one vectorised call.
    - **Ladder search.** A sample keeps its parameters along a ladder, so one the model gets right is scored
      at the levels a search for its breaking level needs (ordered by the last counts), its other levels read
      off that level (:mod:`lightning_synth.ladder`); samples it gets wrong and cells near the threshold: all.

    Inputs that are not images ``(B, C, H, W)`` (tabular rows, token ids) are analysed by class, confusion
    and slice; perturbation probes are skipped with one warning. Images outside ``[0, 1]`` (uint8,
    mean/std-normalised) are perturbed in ``[0, 1]`` and mapped back to the user's range and dtype
    (:class:`~lightning_synth.value_range.ValueRange`, read from the first validation batch).

    Args:
        perturbations: names from the perturbation bank to probe with (default: the whole bank).
        severities: severity levels to probe (each in ``1..5``).
        max_samples: validation samples (over all ranks) re-scored under perturbations.
        every_n_epochs: analyse every N validation epochs.
        frontier_threshold: accuracy drop that marks a perturbation's failure frontier.
        top_k_confusions: confused class pairs to report.
        min_support: classes/groups with fewer validation samples are not reported.
        max_groups: slice values must be integers below this.
        class_names: display names of the classes (default: indices).
        batch_adapter: how to read a batch (:class:`~lightning_synth.batch.BatchAdapter` or a callable
            returning ``(inputs, targets)``); default reads tuples/lists/dicts.
        slice_fn: returns ``{slice_name: (B,) int tensor}`` for a batch, for metadata the batch lacks.
        logits_fn: ``(pl_module, inputs) -> logits``; default ``pl_module(inputs)``.
        seed: seed of the probe perturbations.
        verbose: print the top weaknesses after each analysis.
        pictures: write a heatmap and a frontier chart beside each profile JSON (and log them as images to
            W&B/TensorBoard); needs matplotlib (skipped with one warning without it).
        full_sweep_every: every N-th analysis probes every severity (1: always, as a full sweep).
        sequential: stop probing a cell once its place relative to the frontier is settled.
        probe_batch_size: images per probe forward (default: the validation batch size, so probing needs
            no more memory than validation).
        ignore_index: target value that marks a sample to leave out (as in ``cross_entropy``).
        value_range: the range and dtype of the inputs (default: detected from the first validation batch).
        quick_reads: on the first analysis and for moved frontiers, stop every settled cell at a quarter of
            the budget: cheaper, but a noisier ranking of weaknesses (``benchmarks/analyzer_replay.py``).
        ladder_search: search each ladder for the samples the model gets right (see above).
        probe_layout: memory layout of the probe images: ``"auto"``: channels-last on the CPU (faster for conv
            nets; falls back, warned once, if the forward fails), ``"channels_last"``, ``"preserve"``.

    Raises:
        ValueError: if a number is out of range, a severity is not in ``1..5``, a perturbation is unknown or
            a class name is empty.
        TypeError: if a callable argument is not callable.

    Example:
        >>> from lightning_synth.datasets import DigitsDataModule
        >>> class Net(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
        ...     def forward(self, x):
        ...         return self.net(x)
        ...     def training_step(self, batch, batch_idx):
        ...         return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])
        ...     def validation_step(self, batch, batch_idx):
        ...         self(batch[0])
        ...     def configure_optimizers(self):
        ...         return torch.optim.Adam(self.parameters(), 1e-2)
        >>> cb = FailureModeCallback(perturbations=["rotation"], max_samples=64)
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_progress_bar=False,
        ...                     enable_model_summary=False, enable_checkpointing=False)
        >>> trainer.fit(Net(), datamodule=DigitsDataModule())
        >>> cb.profile.top(1, kind="perturbation")[0].name
        'rotation'
    """

    STAGES = (0.25, 0.625)  # fractions of the probe budget after which cells stop (the last: the rank stage)
    REFRESH_SHARE = 1 / 3  # share of the cells, those with the largest last gaps, that window passes re-probe
    PARAM_CACHE_BYTES = 256 * 2**20  # probe parameters kept across epochs (the probe subset does not change)
    EXACT_BAND = 0.05  # ladder search: cells with a last gap this close to the threshold are scored on every sample

    def __init__(
        self,
        perturbations: Sequence[str] | None = None,
        severities: Sequence[int] = (1, 2, 3, 4, 5),
        max_samples: int = 256,
        every_n_epochs: int = 1,
        frontier_threshold: float = 0.1,
        top_k_confusions: int = 5,
        min_support: int = 5,
        max_groups: int = 64,
        class_names: Sequence[str] | None = None,
        batch_adapter: BatchAdapter | Callable[[Any], Any] | None = None,
        slice_fn: SliceFn | None = None,
        logits_fn: LogitsFn | None = None,
        seed: int = 0,
        verbose: bool = False,
        pictures: bool = True,
        full_sweep_every: int = 5,
        sequential: bool = True,
        probe_batch_size: int | None = None,
        ignore_index: int = -100,
        value_range: ValueRange | None = None,
        quick_reads: bool = False,
        ladder_search: bool = True,
        probe_layout: ProbeLayout = "auto",
    ) -> None:
        super().__init__()
        self.bank = PerturbationBank(perturbations)
        check_int("max_samples", max_samples, 0)
        check_int("every_n_epochs", every_n_epochs, 1)
        check_int("top_k_confusions", top_k_confusions, 0)
        check_int("min_support", min_support, 1)
        check_int("max_groups", max_groups, 1)
        check_int("full_sweep_every", full_sweep_every, 1)
        check_int("ignore_index", ignore_index, -(2**62))
        if probe_batch_size is not None:
            check_int("probe_batch_size", probe_batch_size, 1)
        for flag, value in (("sequential", sequential), ("quick_reads", quick_reads), ("ladder_search", ladder_search)):
            check_bool(flag, value)
        if value_range is not None and not isinstance(value_range, ValueRange):
            raise TypeError(f"`value_range` must be a ValueRange or None, got {type(value_range).__name__}")
        if class_names is not None and (
                isinstance(class_names, str) or any(not isinstance(c, str) or not c.strip() for c in class_names)):
            raise ValueError(f"`class_names` must be a sequence of non-empty strings, got {class_names!r}")
        if isinstance(severities, (str, int)) or not severities:
            raise ValueError(f"`severities` must be a non-empty sequence of levels 1..5, got {severities!r}")
        ladder_top = min(p.max_severity for p in self.bank)
        if any(not isinstance(s, int) or not 1 <= s <= ladder_top for s in severities):
            raise ValueError(f"`severities` must be integers in 1..{ladder_top}, got {list(severities)}")
        if not 0.0 < frontier_threshold <= 1.0:
            raise ValueError(f"`frontier_threshold` must be in (0, 1], got {frontier_threshold}")
        for name, fn in (("slice_fn", slice_fn), ("logits_fn", logits_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"`{name}` must be callable or None, got {type(fn).__name__}")
        self.severities = tuple(sorted(set(severities)))
        self.max_samples, self.every_n_epochs = max_samples, every_n_epochs
        self.frontier_threshold, self.top_k_confusions = frontier_threshold, top_k_confusions
        self.min_support, self.max_groups = min_support, max_groups
        self.class_names = list(class_names) if class_names is not None else None
        self.adapter = resolve_batch_adapter(batch_adapter)
        self.slice_fn, self.logits_fn = slice_fn, logits_fn or _default_logits
        self.seed, self.verbose, self.pictures = seed, verbose, pictures
        self.full_sweep_every, self.sequential = full_sweep_every, sequential
        self.probe_batch_size, self.ignore_index = probe_batch_size, ignore_index
        self.value_range = value_range
        self.profile: WeaknessProfile | None = None
        self.history: list[WeaknessProfile] = []
        self.probe_forwards = 0  # perturbed images scored, over the run (what probing cost)
        # Which cells to probe and when to stop (identical on every rank: derived from counts summed over ranks)
        self.prober = PerturbationProber(
            self.bank, self.severities, max_samples, frontier_threshold, full_sweep_every, sequential,
            probe_batch_size, seed, stages=self.STAGES, param_cache_bytes=self.PARAM_CACHE_BYTES,
            refresh_top=math.ceil(len(self.bank) * len(self.severities) * self.REFRESH_SHARE),
            quick_reads=quick_reads, ladder_search=ladder_search, exact_band=self.EXACT_BAND,
        )
        self._tap = LogitsTap(probe_layout)  # checks probe_layout
        self._warned_not_images, self._active = False, False
        self._metrics: dict[str, Any] = {}
        self._slice_metrics: dict[str, GroupAccuracy] = {}
        self._padding = PaddingFilter()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(perturbations=tuple(self.bank.names), every_n_epochs=self.every_n_epochs)

    # ----------------------------------------------------------------------------------------- hooks
    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.limit_val_batches == 0 or not _has_val_loop(trainer, pl_module):
            rank_zero_warn(
                "FailureModeCallback found no validation data (no `val_dataloader` or `limit_val_batches=0`): "
                "it will not analyse anything. Give the datamodule a validation split to get a WeaknessProfile."
            )

    @override
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._active = not trainer.sanity_checking and self._due(trainer)
        if self._active:
            self._start_pass(trainer, pl_module)

    @override
    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._tap.captured = None

    @override
    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._active or dataloader_idx != 0:
            return
        view = self.adapter.unpack(batch)
        logits = self._tap.from_step(outputs, view, pl_module, self.logits_fn)
        self._update(trainer, pl_module, batch, view, logits)

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active:
            return
        self._active = False
        self._tap.remove()
        profile = self._finish_pass(trainer)
        if profile is not None:
            self._publish(trainer, pl_module, profile)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._tap.remove()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": [p.to_json() for p in self.history], "profile": self.profile and self.profile.to_json(),
                **self.prober.state_dict(), "probe_forwards": self.probe_forwards, "tap": self._tap.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [WeaknessProfile.from_json(p) for p in state_dict.get("history", [])]
        latest = state_dict.get("profile")
        self.profile = WeaknessProfile.from_json(latest) if latest else None
        self.prober.load_state_dict(state_dict, analyses=len(self.history))
        self.probe_forwards = int(state_dict.get("probe_forwards", 0))
        self._tap.load_state_dict(state_dict.get("tap", {}))  # absent from older checkpoints

    # ------------------------------------------------------------------------------------ on demand
    @torch.inference_mode()
    def analyze(
        self, trainer: L.Trainer, pl_module: L.LightningModule, dataloader: Any | None = None
    ) -> WeaknessProfile | None:
        """Run an analysis now (outside the validation loop) over ``dataloader`` or the validation data.

        Under DDP call it on every rank. Returns the new profile (also stored in :attr:`profile`).
        """
        loader = dataloader if dataloader is not None else _first_val_loader(trainer, pl_module)
        was_training = pl_module.training
        pl_module.eval()
        try:
            self._start_pass(trainer, pl_module, capture=False, loader=loader)
            for batch in loader:
                batch = trainer.strategy.batch_to_device(batch, pl_module.device)
                view = self.adapter.unpack(batch)
                self._update(trainer, pl_module, batch, view, self.logits_fn(pl_module, view.inputs))
            profile = self._finish_pass(trainer)
        finally:
            pl_module.train(was_training)
        if profile is not None:
            self._publish(trainer, pl_module, profile)
        return profile

    # ------------------------------------------------------------------------------------- helpers
    def _due(self, trainer: L.Trainer) -> bool:
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0 or trainer.state.fn != "fit"

    def _start_pass(
        self, trainer: L.Trainer, pl_module: L.LightningModule, capture: bool = True, loader: Any | None = None
    ) -> None:
        self._tap.remove()
        self._metrics, self._slice_metrics = {}, {}
        self._padding = PaddingFilter(_padded_dataset_len(trainer, loader))
        self.prober.start_pass(self.profile, max(trainer.world_size, 1), trainer.global_rank, pl_module.device)
        if capture:
            self._tap.attach(pl_module)

    def _update(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, view: BatchView, logits: Tensor
    ) -> None:
        targets = view.targets.to(logits.device).long().reshape(-1)
        keep = self._padding.keep(targets, self.ignore_index, max(trainer.world_size, 1), trainer.global_rank)
        if "confusion" not in self._metrics:
            self._init_class_metrics(logits.shape[1], pl_module.device)
        num_classes = logits.shape[1]
        valid = targets[keep.to(targets.device)]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= num_classes):
            raise ValueError(
                f"FailureModeCallback got labels in [{int(valid.min())}, {int(valid.max())}] but the model has "
                f"{num_classes} classes: labels must be in [0, {num_classes}) (or `ignore_index`="
                f"{self.ignore_index} to leave a sample out)."
            )
        keep = keep.to(logits.device)
        self._metrics["confusion"].update(logits[keep], targets[keep])
        self._metrics["recall"].update(logits[keep], targets[keep])
        hits = logits.argmax(1) == targets
        slices = dict(view.slices)
        if self.slice_fn is not None:
            slices.update(self.slice_fn(batch))
        for key, groups in slices.items():
            if key not in self._slice_metrics:
                self._slice_metrics[key] = GroupAccuracy(self.max_groups).to(pl_module.device)
            groups = groups.reshape(-1).to(hits.device)
            self._slice_metrics[key].update(groups[keep], hits[keep])
        if self.prober.wants(len(targets)) and self._images(view.inputs):
            self.probe_forwards += self.prober.probe(
                view.inputs, targets, hits, keep, lambda x: self._tap.probe(pl_module, x, self.logits_fn),
                lambda x: self._range(trainer, x), lambda t: trainer.strategy.reduce(t, reduce_op="sum"))

    def _init_class_metrics(self, num_classes: int, device: torch.device) -> None:
        if self.class_names is not None and len(self.class_names) != num_classes:
            raise ValueError(f"`class_names` has {len(self.class_names)} names but the model has {num_classes} classes")
        labels = self.class_names or [str(c) for c in range(num_classes)]
        self._metrics["confusion"] = MulticlassConfusionMatrix(num_classes).to(device)
        recall = MulticlassRecall(num_classes, average=None)
        self._metrics["recall"] = ClasswiseWrapper(recall, labels=labels, prefix="weakness/class_recall/").to(device)

    def _images(self, inputs: Any) -> bool:
        """Whether ``inputs`` are images the bank can perturb (warns once when not)."""
        if is_image_batch(inputs):
            return True
        if not self._warned_not_images:
            self._warned_not_images = True
            got = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
            rank_zero_warn(
                f"FailureModeCallback: the inputs {got} are not images (B, C, H, W): perturbation probes are "
                "skipped; classes, confusions and slices are analysed."
            )
        return False

    def _range(self, trainer: L.Trainer, inputs: Tensor) -> ValueRange:
        if self.value_range is None:
            self.value_range = gathered_value_range(trainer, inputs)
        return self.value_range

    def _finish_pass(self, trainer: L.Trainer) -> WeaknessProfile | None:
        if "confusion" not in self._metrics:
            rank_zero_warn("FailureModeCallback saw no validation samples this epoch: the validation set is empty. "
                           "It keeps the previous profile.")
            return None
        confusion = self._metrics["confusion"].compute()
        # Same call on every rank: reduce is a collective under DDP.
        counts = self.prober.finish_pass(lambda t: trainer.strategy.reduce(t, reduce_op="sum"))
        slice_counts = {k: m.compute() for k, m in sorted(self._slice_metrics.items())}
        self._recall = self._metrics["recall"].compute()
        profile = build_profile(
            confusion, counts[0], counts[1], self.bank.names, self.severities, slice_counts,
            class_names=self.class_names, threshold=self.frontier_threshold,
            top_k_confusions=self.top_k_confusions, min_support=self.min_support, epoch=trainer.current_epoch,
            probe_clean_correct=counts[2],
        )
        self.prober.after_analysis(profile, self.profile)
        return profile

    def _publish(self, trainer: L.Trainer, pl_module: L.LightningModule, profile: WeaknessProfile) -> None:
        self.profile = profile
        self.history.append(profile)
        metrics = profile_metrics(profile, self._slice_metrics, self._recall)
        if trainer.state.fn == "fit" and trainer.validating:
            pl_module.log_dict(metrics, sync_dist=False, rank_zero_only=False)
        elif trainer.global_rank == 0:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        log_table(trainer, "weakness/profile", WeaknessProfile.TABLE_COLUMNS, profile.rows())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = write_json_artifact(trainer, f"profile_epoch{profile.epoch}.json", profile.to_json(indent=2))
        if path is not None and self.pictures:
            log_profile_pictures(trainer, path, self.history, list(self.severities))
        if self.verbose:
            rank_zero_info(profile.format())

