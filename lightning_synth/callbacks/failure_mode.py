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
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.hooks import RemovableHandle
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassRecall
from torchmetrics.wrappers import ClasswiseWrapper
from typing_extensions import override

from lightning_synth._validation import check_int
from lightning_synth.analysis import GroupAccuracy, ProbeAccuracy, build_profile
from lightning_synth.batch import BatchAdapter, BatchView, resolve_batch_adapter
from lightning_synth.logging import log_table, write_json_artifact
from lightning_synth.perturbations import Params, Perturbation, PerturbationBank
from lightning_synth.profile import WeaknessProfile

__all__ = ["FailureModeCallback"]

LogitsFn = Callable[[L.LightningModule, Tensor], Tensor]
SliceFn = Callable[[Any], dict[str, Tensor]]


def _default_logits(module: L.LightningModule, inputs: Tensor) -> Tensor:
    return module(inputs)


class FailureModeCallback(Callback):
    """Builds a :class:`~lightning_synth.profile.WeaknessProfile` at the end of validation.

    Per class and the most confused class pairs (from the clean predictions the validation loop already
    makes), per perturbation of the shared bank at each severity (on a bounded subset), and per slice
    (batch attributes or ``slice_fn``). All counts are torchmetrics states, so under DDP every rank ends
    with the same profile, equal to a single-process run on the same data.

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

    Raises:
        ValueError: if a number is out of range, a severity is not in ``1..5`` or a perturbation is unknown.
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

    PARAM_CACHE_BYTES = 256 * 2**20  # probe parameters kept across epochs (the probe subset does not change)

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
    ) -> None:
        super().__init__()
        self.bank = PerturbationBank(perturbations)
        check_int("max_samples", max_samples, 0)
        check_int("every_n_epochs", every_n_epochs, 1)
        check_int("top_k_confusions", top_k_confusions, 0)
        check_int("min_support", min_support, 1)
        check_int("max_groups", max_groups, 1)
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
        self.seed, self.verbose = seed, verbose
        self.profile: WeaknessProfile | None = None
        self.history: list[WeaknessProfile] = []
        self._param_cache: dict[tuple[Any, ...], Params] = {}
        self._param_cache_bytes = 0
        self._reset_run_state()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(perturbations=tuple(self.bank.names), every_n_epochs=self.every_n_epochs)

    def _reset_run_state(self) -> None:
        self._active = False
        self._metrics: dict[str, Any] = {}
        self._slice_metrics: dict[str, GroupAccuracy] = {}
        self._captured: Tensor | None = None
        self._capturing = False
        self._hook: RemovableHandle | None = None
        self._seen = 0
        self._warned_extra_forward = False

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
        self._captured = None

    @override
    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._active or dataloader_idx != 0:
            return
        view = self.adapter.unpack(batch)
        logits = self._logits_from_step(outputs, view, pl_module)
        self._update(trainer, pl_module, batch, view, logits)

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active:
            return
        self._active = False
        self._remove_hook()
        profile = self._finish_pass(trainer)
        if profile is not None:
            self._publish(trainer, pl_module, profile)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._remove_hook()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": [p.to_json() for p in self.history], "profile": self.profile and self.profile.to_json()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [WeaknessProfile.from_json(p) for p in state_dict.get("history", [])]
        latest = state_dict.get("profile")
        self.profile = WeaknessProfile.from_json(latest) if latest else None

    # ------------------------------------------------------------------------------------ on demand
    @torch.no_grad()
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
            self._start_pass(trainer, pl_module, capture=False)
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

    def _start_pass(self, trainer: L.Trainer, pl_module: L.LightningModule, capture: bool = True) -> None:
        self._remove_hook()
        self._metrics = {"probe": ProbeAccuracy(len(self.bank), len(self.severities)).to(pl_module.device)}
        self._slice_metrics = {}
        self._seen = 0
        if capture:
            self._hook = pl_module.register_forward_hook(self._capture)

    def _capture(self, module: Any, args: Any, output: Any) -> None:
        if not self._capturing and isinstance(output, Tensor):
            self._captured = output

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _logits_from_step(self, outputs: Any, view: BatchView, pl_module: L.LightningModule) -> Tensor:
        if isinstance(outputs, dict):
            for key in ("logits", "preds", "outputs"):
                value = outputs.get(key)
                if isinstance(value, Tensor) and value.ndim == 2 and value.shape[0] == len(view.targets):
                    return value
        captured = self._captured
        if captured is not None and captured.ndim == 2 and captured.shape[0] == len(view.targets):
            return captured
        if not self._warned_extra_forward:
            self._warned_extra_forward = True
            rank_zero_warn(
                "FailureModeCallback could not see the logits of `validation_step` (it neither called "
                "`self(x)` nor returned {'logits': ...}), so it runs one extra forward per validation batch. "
                "Return `{'logits': logits}` from `validation_step` to avoid it."
            )
        return self._forward(pl_module, view.inputs)

    def _forward(self, pl_module: L.LightningModule, inputs: Tensor) -> Tensor:
        self._capturing = True
        try:
            logits = self.logits_fn(pl_module, inputs)
        finally:
            self._capturing = False
        if not isinstance(logits, Tensor) or logits.ndim != 2:
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise TypeError(
                f"FailureModeCallback expected (batch, classes) logits from the model, got {got}. "
                "Pass `logits_fn=lambda module, x: ...` returning logits."
            )
        return logits

    def _update(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, view: BatchView, logits: Tensor
    ) -> None:
        targets = view.targets.to(logits.device).long().reshape(-1)
        if "confusion" not in self._metrics:
            self._init_class_metrics(logits.shape[1], pl_module.device)
        self._metrics["confusion"].update(logits, targets)
        self._metrics["recall"].update(logits, targets)
        hits = logits.argmax(1) == targets
        slices = dict(view.slices)
        if self.slice_fn is not None:
            slices.update(self.slice_fn(batch))
        for key, groups in slices.items():
            if key not in self._slice_metrics:
                self._slice_metrics[key] = GroupAccuracy(self.max_groups).to(pl_module.device)
            self._slice_metrics[key].update(groups.to(hits.device), hits)
        self._probe(trainer, pl_module, view.inputs, targets, hits)

    def _init_class_metrics(self, num_classes: int, device: torch.device) -> None:
        if self.class_names is not None and len(self.class_names) != num_classes:
            raise ValueError(f"`class_names` has {len(self.class_names)} names but the model has {num_classes} "
                             "classes")
        labels = self.class_names or [str(c) for c in range(num_classes)]
        self._metrics["confusion"] = MulticlassConfusionMatrix(num_classes).to(device)
        recall = MulticlassRecall(num_classes, average=None)
        self._metrics["recall"] = ClasswiseWrapper(recall, labels=labels, prefix="weakness/class_recall/").to(device)

    def _probe(
        self, trainer: L.Trainer, pl_module: L.LightningModule, inputs: Tensor, targets: Tensor, hits: Tensor
    ) -> None:
        world = max(trainer.world_size, 1)
        budget = math.ceil(self.max_samples / world) - self._seen
        take = max(min(budget, len(targets)), 0)
        if take == 0:
            return
        # The validation sampler shards round-robin, so local position p on rank r is dataset index p*W+r:
        # seeding each sample by that index gives the same perturbation as in a single process.
        positions = torch.arange(self._seen, self._seen + take)
        seeds = (positions * world + trainer.global_rank + self.seed * 1_000_003).tolist()
        self._seen += take
        images, labels = inputs[:take], targets[:take]
        probe: ProbeAccuracy = self._metrics["probe"]
        probe.update(slice(None), 0, hits[:take].unsqueeze(0).expand(len(self.bank), -1))
        for p, op in enumerate(self.bank):
            batch = torch.cat([op.apply(images, self._probe_params(op, images.shape, s, seeds))
                               for s in self.severities])
            logits = self._forward(pl_module, batch).view(len(self.severities), take, -1)
            probe.update(p, slice(1, None), logits.argmax(-1) == labels.unsqueeze(0))

    def _probe_params(self, op: Perturbation, shape: torch.Size, severity: int, seeds: list[int]) -> Params:
        """Per-sample probe parameters, cached across epochs: the probe subset is the same every analysis."""
        key = (op.name, severity, tuple(shape), seeds[0], len(seeds))
        params = self._param_cache.get(key)
        if params is None:
            params = op.sample_params_per_sample(shape, severity, seeds)
            size = sum(v.numel() * v.element_size() for v in params.values())
            if self._param_cache_bytes + size <= self.PARAM_CACHE_BYTES:
                self._param_cache[key] = params
                self._param_cache_bytes += size
        return params

    def _finish_pass(self, trainer: L.Trainer) -> WeaknessProfile | None:
        if "confusion" not in self._metrics:
            rank_zero_warn("FailureModeCallback saw no validation samples this epoch: the validation set is empty. "
                           "It keeps the previous profile.")
            return None
        confusion = self._metrics["confusion"].compute()
        probe: ProbeAccuracy = self._metrics["probe"]
        # Same condition on every rank: compute() is a collective under DDP.
        correct, total = probe.compute() if self.max_samples > 0 else (probe.correct, probe.total)
        slice_counts = {k: m.compute() for k, m in sorted(self._slice_metrics.items())}
        self._recall = self._metrics["recall"].compute()
        return build_profile(
            confusion, correct, total, self.bank.names, self.severities, slice_counts,
            class_names=self.class_names, threshold=self.frontier_threshold,
            top_k_confusions=self.top_k_confusions, min_support=self.min_support, epoch=trainer.current_epoch,
        )

    def _publish(self, trainer: L.Trainer, pl_module: L.LightningModule, profile: WeaknessProfile) -> None:
        self.profile = profile
        self.history.append(profile)
        metrics = {f"weakness/{w.key}": w.gap for w in profile.weaknesses if w.kind != "confusion"}
        metrics["weakness/clean_error"] = profile.clean_error
        for name, sev in profile.frontier.items():
            metrics[f"weakness/frontier/{name}"] = float("nan") if sev is None else sev
        for key in sorted(self._slice_metrics):
            accs = [1 - w.error_rate for w in profile.by_kind("slice") if w.name.startswith(f"{key}=")]
            if accs:
                metrics[f"weakness/worst_group_acc/{key}"] = min(accs)
        metrics.update({k: float(v) for k, v in self._recall.items()})
        if trainer.state.fn == "fit" and trainer.validating:
            pl_module.log_dict(metrics, sync_dist=False, rank_zero_only=False)
        elif trainer.global_rank == 0:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        log_table(trainer, "weakness/profile", WeaknessProfile.TABLE_COLUMNS, profile.rows())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            write_json_artifact(trainer, f"profile_epoch{profile.epoch}.json", profile.to_json(indent=2))
        if self.verbose:
            rank_zero_info(profile.format())


def _has_val_loop(trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
    source = getattr(trainer, "datamodule", None) or pl_module
    if is_overridden("val_dataloader", source):
        return True
    data_source = getattr(trainer.fit_loop.epoch_loop.val_loop, "_data_source", None)
    return bool(data_source is not None and data_source.is_defined())


def _first_val_loader(trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
    source = getattr(trainer, "datamodule", None) or pl_module
    loaders = source.val_dataloader()
    if isinstance(loaders, (list, tuple)):
        if not loaders:
            raise ValueError("`analyze()` found no validation dataloader; pass `dataloader=`.")
        return loaders[0]
    return loaders
