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
from torch.utils.data import DistributedSampler
from torch.utils.hooks import RemovableHandle
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassRecall
from torchmetrics.wrappers import ClasswiseWrapper
from typing_extensions import override

from lightning_synth._validation import check_int
from lightning_synth.analysis import GroupAccuracy, ProbeAccuracy, build_profile, paired_gap_interval
from lightning_synth.batch import BatchAdapter, BatchView, resolve_batch_adapter
from lightning_synth.logging import log_profile_pictures, log_table, write_json_artifact
from lightning_synth.perturbations import Params, Perturbation, PerturbationBank
from lightning_synth.profile import WeaknessProfile
from lightning_synth.value_range import ValueRange

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
    with the same profile, equal to a single-process run on the same data (padding samples that the
    distributed sampler repeats are counted once).

    Probing costs a fraction of a full sweep (perturbations x severities x ``max_samples``):

    - **Where it matters.** After the first analysis, only severities around each perturbation's last
      failure frontier (one level below and above) are probed; the other cells keep their last
      measurement. A full sweep runs every ``full_sweep_every`` analyses and after a frontier moved by more
      than a level.
    - **Sequential.** The probe budget is spent in stages (a quarter, a half, all of ``max_samples``); a
      cell stops once the confidence interval of its gap (paired with the clean predictions of the same
      samples) lies entirely on one side of ``frontier_threshold``. Stage decisions use counts summed over
      ranks, so every rank decides alike.
    - **Batched.** Per validation batch, every active cell's perturbed copies are concatenated and scored
      in forwards of ``probe_batch_size``; per-sample parameters come from counter-based hashing of (seed,
      sample index), drawn in one vectorised call.

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

    STAGES = (0.25, 0.5)  # fractions of the probe budget after which settled cells stop
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
        pictures: bool = True,
        full_sweep_every: int = 5,
        sequential: bool = True,
        probe_batch_size: int | None = None,
        ignore_index: int = -100,
        value_range: ValueRange | None = None,
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
        if not isinstance(sequential, bool):
            raise TypeError(f"`sequential` must be a bool, got {type(sequential).__name__}: {sequential!r}")
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
        self._param_cache: dict[tuple[Any, ...], Params] = {}
        self._param_cache_bytes = 0
        # Decision state (identical on every rank: derived from counts summed over ranks)
        self._analyses = 0
        self._full_next = True
        self._moved: set[str] = set()  # perturbations whose frontier moved by more than a level
        self._memory: Tensor | None = None  # (4, P, S + 1) counts of each cell's last measurement
        self._warned_not_images = False
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
        self._position = 0
        self._warned_extra_forward = False
        self._plan: Tensor | None = None  # (P, S) cells to probe this pass
        self._stages: list[int] = []
        self._dataset_len: int | None = None

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
        return {
            "history": [p.to_json() for p in self.history],
            "profile": self.profile and self.profile.to_json(),
            "analyses": self._analyses,
            "full_next": self._full_next,
            "moved": sorted(self._moved),
            "memory": None if self._memory is None else self._memory.tolist(),
            "probe_forwards": self.probe_forwards,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [WeaknessProfile.from_json(p) for p in state_dict.get("history", [])]
        latest = state_dict.get("profile")
        self.profile = WeaknessProfile.from_json(latest) if latest else None
        self._analyses = int(state_dict.get("analyses", len(self.history)))
        self._full_next = bool(state_dict.get("full_next", True))
        self._moved = set(state_dict.get("moved", []))
        memory = state_dict.get("memory")
        self._memory = None if memory is None else torch.tensor(memory, dtype=torch.float64)
        if self._memory is not None and tuple(self._memory.shape[1:]) != (len(self.bank), len(self.severities) + 1):
            self._memory, self._full_next = None, True  # another bank or ladder: start with a full sweep
        self.probe_forwards = int(state_dict.get("probe_forwards", 0))

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
        self._remove_hook()
        self._metrics = {"probe": ProbeAccuracy(len(self.bank), len(self.severities)).to(pl_module.device)}
        self._slice_metrics = {}
        self._seen = 0
        self._position = 0
        self._plan = self._probe_plan()
        world = max(trainer.world_size, 1)
        per_rank = math.ceil(self.max_samples / world)
        stages = {math.ceil(per_rank * f) for f in self.STAGES} if self.sequential else set()
        self._stages = sorted(s for s in stages if 0 < s < per_rank)
        self._dataset_len = _padded_dataset_len(trainer, loader)
        if capture:
            self._hook = pl_module.register_forward_hook(self._capture)

    def _probe_plan(self) -> Tensor:
        """Which (perturbation, severity) cells to probe: all on a full sweep, else a window of one level
        around each perturbation's last frontier, and the whole ladder of a perturbation whose frontier moved
        by more than a level (a deterministic function of synced state, so identical on every rank)."""
        plan = torch.ones(len(self.bank), len(self.severities), dtype=torch.bool)
        full = self._full_next or self._memory is None or self.profile is None or (
            self._analyses % self.full_sweep_every == 0)
        if full:
            return plan
        sev = torch.tensor(self.severities, dtype=torch.float64)
        for p, name in enumerate(self.bank.names):
            front = self.profile.frontier.get(name)  # type: ignore[union-attr]
            if name in self._moved:
                continue
            if front is None:  # never reached the threshold: watch the top two levels
                plan[p] = sev >= sev[-min(2, len(sev))]
            else:  # the level nearest the frontier, one below and one above
                near = math.floor(front + 0.5)
                plan[p] = (sev >= near - 1) & (sev <= near + 1)
        return plan

    def _capture(self, module: Any, args: Any, output: Any) -> None:
        if not self._capturing and isinstance(output, Tensor):
            self._captured = output

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _logits_from_step(self, outputs: Any, view: BatchView, pl_module: L.LightningModule) -> Tensor:
        n = len(view.targets)
        if isinstance(outputs, dict):
            for key in ("logits", "preds", "outputs"):
                value = outputs.get(key)
                if isinstance(value, Tensor) and value.ndim in (1, 2) and value.shape[0] == n:
                    return _as_class_logits(value)
        captured = self._captured
        if captured is not None and captured.ndim in (1, 2) and captured.shape[0] == n:
            return _as_class_logits(captured)
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
            trainer = pl_module._trainer
            if trainer is not None:
                with trainer.precision_plugin.forward_context():  # the model's own precision
                    logits = self.logits_fn(pl_module, inputs)
            else:
                logits = self.logits_fn(pl_module, inputs)
        finally:
            self._capturing = False
        if not isinstance(logits, Tensor) or logits.ndim not in (1, 2):
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise TypeError(
                f"FailureModeCallback expected (batch, classes) logits from the model, got {got}. "
                "Pass `logits_fn=lambda module, x: ...` returning logits."
            )
        return _as_class_logits(logits)

    def _update(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, view: BatchView, logits: Tensor
    ) -> None:
        targets = view.targets.to(logits.device).long().reshape(-1)
        keep = self._kept(trainer, len(targets), targets)
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
        self._probe(trainer, pl_module, view.inputs, targets, hits, keep)

    def _kept(self, trainer: L.Trainer, n: int, targets: Tensor) -> Tensor:
        """Which samples of this batch count: not an ignore label, not a padding repeat of the distributed
        sampler (local position ``p`` on rank ``r`` is global position ``p * W + r``)."""
        keep = (targets != self.ignore_index).cpu()
        if self._dataset_len is not None:
            world = max(trainer.world_size, 1)
            positions = torch.arange(self._position, self._position + n) * world + trainer.global_rank
            keep &= positions < self._dataset_len
        self._position += n
        return keep

    def _init_class_metrics(self, num_classes: int, device: torch.device) -> None:
        if self.class_names is not None and len(self.class_names) != num_classes:
            raise ValueError(f"`class_names` has {len(self.class_names)} names but the model has {num_classes} "
                             "classes")
        labels = self.class_names or [str(c) for c in range(num_classes)]
        self._metrics["confusion"] = MulticlassConfusionMatrix(num_classes).to(device)
        recall = MulticlassRecall(num_classes, average=None)
        self._metrics["recall"] = ClasswiseWrapper(recall, labels=labels, prefix="weakness/class_recall/").to(device)

    def _images(self, trainer: L.Trainer, inputs: Any) -> bool:
        """Whether ``inputs`` are images the bank can perturb (warns once when not)."""
        if isinstance(inputs, Tensor) and inputs.ndim == 4 and inputs.shape[1] in (1, 3, 4) and min(
                inputs.shape[-2:]) >= 3:
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
            if inputs.is_floating_point():
                local = torch.stack([inputs.detach().min(), inputs.detach().max()]).double().reshape(1, 2)
                both = trainer.strategy.all_gather(local).reshape(-1, 2).cpu()  # same range on every rank
                low, high = float(both[:, 0].min()), float(both[:, 1].max())
                self.value_range = ValueRange.detect(torch.tensor([low, high], dtype=inputs.dtype))
            else:
                self.value_range = ValueRange.detect(inputs[:1])
        return self.value_range

    def _probe(
        self, trainer: L.Trainer, pl_module: L.LightningModule, inputs: Any, targets: Tensor, hits: Tensor,
        keep: Tensor,
    ) -> None:
        world = max(trainer.world_size, 1)
        budget = math.ceil(self.max_samples / world) - self._seen
        take = max(min(budget, len(targets)), 0)
        if take == 0 or self._plan is None or not self._images(trainer, inputs):
            return
        start = 0
        while start < take:
            stop = take
            for stage in self._stages:
                if self._seen < stage < self._seen + (take - start):
                    stop = start + stage - self._seen
                    break
            self._probe_segment(trainer, pl_module, inputs[start:stop], targets[start:stop], hits[start:stop],
                                keep[start:stop])
            self._seen += stop - start
            start = stop
            if self._seen in self._stages:
                self._sequential_stop(trainer)

    def _probe_segment(
        self, trainer: L.Trainer, pl_module: L.LightningModule, inputs: Tensor, targets: Tensor, hits: Tensor,
        keep: Tensor,
    ) -> None:
        assert self._plan is not None
        world = max(trainer.world_size, 1)
        # The validation sampler shards round-robin, so local position p on rank r is dataset index p*W+r:
        # seeding each sample by that index gives the same perturbation as in a single process.
        positions = torch.arange(self._seen, self._seen + len(targets))
        seeds = positions * world + trainer.global_rank + self.seed * 1_000_003
        keep = keep.to(inputs.device)
        images, labels, clean = inputs[keep], targets[keep], hits[keep]
        seeds = seeds[keep.cpu()]
        probe: ProbeAccuracy = self._metrics["probe"]
        probe.update(slice(None), 0, clean.unsqueeze(0).expand(len(self.bank), -1))
        cells = self._plan.nonzero().tolist()
        if not len(labels) or not cells:
            return
        vr = self._range(trainer, images)
        unit = vr.to_unit(images)
        chunk = self.probe_batch_size or max(len(targets), 1)
        ops = list(self.bank)
        batch: list[Tensor] = []
        pending: list[tuple[int, int]] = []
        queued = 0

        def flush() -> None:
            nonlocal batch, pending, queued
            if not batch:
                return
            preds = self._forward(pl_module, torch.cat(batch)).argmax(-1).view(len(pending), -1)
            correct = preds == labels.unsqueeze(0).to(preds.device)
            for (p, s), row in zip(pending, correct):
                probe.update(p, s + 1, row, clean)
            self.probe_forwards += len(pending) * len(labels)
            batch, pending, queued = [], [], 0

        for p, s in cells:
            op: Perturbation = ops[p]
            params = self._probe_params(op, unit.shape, self.severities[s], seeds)
            batch.append(vr.from_unit(op.apply(unit, params)).to(inputs.dtype))
            pending.append((p, s))
            queued += len(labels)
            if queued + len(labels) > chunk:
                flush()
        flush()

    def _sequential_stop(self, trainer: L.Trainer) -> None:
        """Stop cells whose gap's confidence interval lies on one side of the frontier threshold (on counts
        summed over ranks, so every rank stops the same cells)."""
        if self._plan is None:
            return
        probe: ProbeAccuracy = self._metrics["probe"]
        counts = trainer.strategy.reduce(probe.counts().clone(), reduce_op="sum").cpu()
        _, low, high = paired_gap_interval(counts[:, :, 1:])
        settled = (low > self.frontier_threshold) | (high < self.frontier_threshold)
        self._plan = self._plan & ~(settled & (counts[1, :, 1:] > 0))

    def _probe_params(self, op: Perturbation, shape: torch.Size, severity: int, seeds: Tensor) -> Params:
        """Per-sample probe parameters, cached across epochs: the probe subset is the same every analysis."""
        key = (op.name, severity, tuple(shape), tuple(seeds.tolist()) if not op.keyed_draws else (
            int(seeds[0]), len(seeds)))
        params = self._param_cache.get(key) if not op.keyed_draws else None
        if params is None:
            params = op.sample_params_per_sample(shape, severity, seeds)
            size = sum(v.numel() * v.element_size() for v in params.values())
            if not op.keyed_draws and self._param_cache_bytes + size <= self.PARAM_CACHE_BYTES:
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
        # Same call on every rank: reduce is a collective under DDP.
        counts = trainer.strategy.reduce(probe.counts().clone(), reduce_op="sum").double().cpu()
        counts = self._carry_over(counts)
        slice_counts = {k: m.compute() for k, m in sorted(self._slice_metrics.items())}
        self._recall = self._metrics["recall"].compute()
        profile = build_profile(
            confusion, counts[0], counts[1], self.bank.names, self.severities, slice_counts,
            class_names=self.class_names, threshold=self.frontier_threshold,
            top_k_confusions=self.top_k_confusions, min_support=self.min_support, epoch=trainer.current_epoch,
            probe_clean_correct=counts[2],
        )
        self._after_analysis(profile)
        return profile

    def _carry_over(self, counts: Tensor) -> Tensor:
        """Cells not probed this pass keep their last measurement (counts and paired gap)."""
        if self._memory is not None and self._memory.shape == counts.shape:
            fresh = counts[1] > 0
            fresh[:, 0] = True
            counts = torch.where(fresh.unsqueeze(0), counts, self._memory)
        if bool((counts[1, :, 1:] > 0).any()):
            self._memory = counts.clone()
        return counts

    def _after_analysis(self, profile: WeaknessProfile) -> None:
        previous = self.profile.frontier if self.profile is not None else {}
        top = float(max(self.severities))
        self._moved = {n for n in self.bank.names
                       if abs((profile.frontier.get(n) or top) - (previous.get(n) or top)) > 1.0}
        self._full_next = self._memory is None
        self._analyses += 1

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
            path = write_json_artifact(trainer, f"profile_epoch{profile.epoch}.json", profile.to_json(indent=2))
        if path is not None and self.pictures:
            log_profile_pictures(trainer, path, self.history, list(self.severities))
        if self.verbose:
            rank_zero_info(profile.format())

def _as_class_logits(logits: Tensor) -> Tensor:
    """``(B, C)`` class scores; a single-logit binary model (``(B,)`` or ``(B, 1)``) becomes two classes."""
    if logits.ndim == 1:
        logits = logits[:, None]
    if logits.shape[1] == 1:
        logits = torch.cat([torch.zeros_like(logits), logits], 1)
    return logits


def _padded_dataset_len(trainer: L.Trainer, loader: Any | None) -> int | None:
    """The dataset length when a distributed sampler pads it with repeats (else ``None``: nothing to drop)."""
    if loader is None:
        loaders = getattr(trainer, "val_dataloaders", None)
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler) and not sampler.drop_last:
        try:
            length = len(sampler.dataset)  # type: ignore[arg-type]
        except TypeError:
            return None
        return length if sampler.total_size > length else None
    return None


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
