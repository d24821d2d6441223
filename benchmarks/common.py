"""Shared parts of the benchmarks: one small CNN for every method, the method registry, training under a
fixed step budget, evaluation helpers and result writing.

Fairness rules that every benchmark script follows through this module:

- every method trains the same :class:`Classifier` (same network, Adam at the same learning rate, same batch
  size);
- every method gets the same number of optimizer steps, ``epochs * ceil(real_train_size / batch_size)``,
  fixed from the *real* training set so synthetic or upsampled data never change the budget;
- a method differs only through its :class:`Method` hooks: the module it builds (a batch transform or a
  loss objective), the callbacks it adds and how it wraps the datamodule.

Adding a method: register it in ``benchmarks/methods.py``, which both scripts import before resolving
``--methods`` (or in any module passed with ``--plugins``). The full lightning_synth method, e.g.::

    from lightning_synth.callbacks import AdaptiveSampling, FailureModeCallback
    from lightning_synth.data import SyntheticDataModule
    from lightning_synth.generators import ScenarioGenerator, TargetedAugmentation

    def wrap(dm, ctx):  # ctx.extras["scenarios"]: {"group": recolour} in the worst-group task, else absent
        generators = [TargetedAugmentation(), ScenarioGenerator(scenarios=ctx.extras.get("scenarios"))]
        return SyntheticDataModule(dm, generators=generators, seed=ctx.seed)

    register_method(Method(
        name="lightning_synth",
        make_callbacks=lambda ctx, dm: [FailureModeCallback(seed=ctx.seed), AdaptiveSampling(seed=ctx.seed)],
        wrap_datamodule=wrap,
        requires=("lightning_synth.callbacks", "lightning_synth.data", "lightning_synth.generators"),
    ))

Ablations (no GAN, no adaptive sampling, no scenarios) are more registrations with other hooks.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from typing_extensions import override

from lightning_synth.batch import BatchAdapter, BatchView
from lightning_synth.consistency import jsd_consistency

__all__ = [
    "TASKS",
    "BatchTransform",
    "Classifier",
    "KorniaPolicy",
    "Method",
    "MethodContext",
    "Objective",
    "UniformPerturbation",
    "add_common_arguments",
    "budget",
    "build_method",
    "check_common_args",
    "classifier_factory",
    "context_from_args",
    "export_torchscript",
    "fit",
    "format_table",
    "load_plugins",
    "machine_info",
    "method_names",
    "predict",
    "quiet_lightning",
    "register_method",
    "resolve_methods",
    "run_method",
    "summarize",
    "write_json",
]

TASKS = ("robustness", "worst_group")
BatchTransform = Callable[[Tensor], Tensor]
"""Training-only, on-device transform of a batch of images ``(B, C, H, W)`` in [0, 1]."""
Objective = Callable[[Tensor, BatchView], Tensor]
"""``objective(per_sample_losses (B,), batch_view) -> scalar loss``; the default is the mean."""
DatamoduleWrapper = Callable[[L.LightningDataModule, "MethodContext"], L.LightningDataModule]
RESERVED_TRAINER_KWARGS = frozenset({"max_steps", "max_epochs", "min_steps", "min_epochs", "max_time"})


def make_network(in_channels: int, num_classes: int, width: int = 32) -> nn.Sequential:
    """The one network of every benchmark: two conv blocks and a two-layer head (about 0.3M weights)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(2 * width * 16, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


class Classifier(L.LightningModule):
    """The benchmarks' classifier: :func:`make_network` trained with Adam on cross-entropy.

    Args:
        in_channels: image channels (1 for Fashion-MNIST, 3 for the tinted worst-group set).
        num_classes: number of classes.
        width: channels of the first conv block.
        lr: Adam learning rate, the same for every method.
        batch_transform: applied to training images only, on their device, without gradient.
        objective: turns per-sample losses into the training loss (e.g. Group DRO); default the mean.
        consistency: makes views of the (transformed) training images, e.g.
            :class:`~lightning_synth.consistency.MixingChains`; cross-entropy stays on the clean images and
            ``consistency_weight`` times :func:`~lightning_synth.consistency.jsd_consistency` of the clean and
            view predictions is added (``1 + len(views)`` forward passes per batch).
        consistency_weight: weight of the Jensen-Shannon term (AugMix uses 12).
        source_consistency: batches carry each sample's real source as their last element (or under
            ``"source"``; ``SyntheticDataModule(deliver_source=True)``): cross-entropy is on the sources and
            ``consistency_weight`` times the Jensen-Shannon term of source and sample predictions is added
            (2 forward passes per batch; the per-sample losses returned are the samples' own). With
            ``consistency`` too, its views of the sources join the Jensen-Shannon term (one pass per view).

    ``training_step`` returns ``{"loss", "per_sample_loss"}`` so callbacks can read per-sample losses in
    ``on_train_batch_end`` without another forward pass. Batches may be ``(x, y)``, ``(x, y, group)`` or
    dicts (read with :class:`~lightning_synth.batch.BatchAdapter`); with groups, validation also logs
    ``val/worst_group_acc``.

    Example:
        >>> model = Classifier(in_channels=1, num_classes=10)
        >>> tuple(model(torch.rand(2, 1, 28, 28)).shape)
        (2, 10)
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 32,
        lr: float = 1e-3,
        batch_transform: BatchTransform | None = None,
        objective: Objective | None = None,
        consistency: Callable[[Tensor], Sequence[Tensor]] | None = None,
        consistency_weight: float = 12.0,
        source_consistency: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
        if num_classes < 2:
            raise ValueError(f"`num_classes` must be >= 2, got {num_classes}")
        if not lr > 0:
            raise ValueError(f"`lr` must be > 0, got {lr!r}")
        if not consistency_weight >= 0:
            raise ValueError(f"`consistency_weight` must be >= 0, got {consistency_weight!r}")
        for name, fn in (("batch_transform", batch_transform), ("objective", objective), ("consistency", consistency)):
            if fn is not None and not callable(fn):
                raise TypeError(f"`{name}` must be callable or None, got {type(fn).__name__}")
        self.net = make_network(in_channels, num_classes, width)
        self.lr = lr
        self.batch_transform = batch_transform
        self.objective = objective
        self.consistency, self.consistency_weight = consistency, float(consistency_weight)
        self.source_consistency = source_consistency
        self.batch_adapter = BatchAdapter()
        self._group_hits: dict[int, list[int]] = {}

    @override
    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        view = self.batch_adapter.unpack(batch)
        images = view.inputs
        if self.batch_transform is not None:
            with torch.no_grad():
                images = self.batch_transform(images)
        if self.source_consistency:
            sources = batch["source"] if isinstance(batch, Mapping) else batch[-1]
            with torch.no_grad():
                views = list(self.consistency(sources)) if self.consistency is not None else []
            logits = self(torch.cat([images, sources, *views])).chunk(2 + len(views))
            losses = F.cross_entropy(logits[0], view.targets, reduction="none")
            clean = F.cross_entropy(logits[1], view.targets, reduction="none")
            loss = self.objective(clean, view) if self.objective is not None else clean.mean()
            loss = loss + self.consistency_weight * jsd_consistency(logits[1], logits[0], *logits[2:])
        elif self.consistency is None:
            losses = F.cross_entropy(self(images), view.targets, reduction="none")
            loss = self.objective(losses, view) if self.objective is not None else losses.mean()
        else:
            with torch.no_grad():
                views = list(self.consistency(images))
            logits = self(torch.cat([images, *views])).chunk(1 + len(views))
            losses = F.cross_entropy(logits[0], view.targets, reduction="none")
            loss = self.objective(losses, view) if self.objective is not None else losses.mean()
            loss = loss + self.consistency_weight * jsd_consistency(*logits)
        self.log("train/loss", loss, prog_bar=False)
        return {"loss": loss, "per_sample_loss": losses.detach()}

    @override
    def on_validation_epoch_start(self) -> None:
        self._group_hits = {}

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        view = self.batch_adapter.unpack(batch)
        logits = self(view.inputs)
        correct = logits.argmax(1) == view.targets
        self.log("val/loss", F.cross_entropy(logits, view.targets))
        self.log("val/acc", correct.float().mean())
        if "group" in view.slices:
            for group, hit in zip(view.slices["group"].tolist(), correct.tolist(), strict=True):
                counts = self._group_hits.setdefault(int(group), [0, 0])
                counts[0] += int(hit)
                counts[1] += 1
        return {"logits": logits.detach()}

    @override
    def on_validation_epoch_end(self) -> None:
        if self._group_hits:
            worst = min(hits / total for hits, total in self._group_hits.values())
            self.log("val/worst_group_acc", worst)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.net.parameters(), lr=self.lr)


class KorniaPolicy(nn.Module):
    """Runs a kornia auto-augment policy so that each sample, not each batch, gets its own operation.

    kornia's ``TrivialAugment``/``RandAugment`` pick one operation per call for the whole batch; calling
    them on chunks of ``chunk_size`` samples (the loader shuffles, so chunks are random) is close to the
    per-image policies of the papers at a fraction of a per-sample loop's cost. Grey images go through as
    three equal channels (the colour operations need RGB) and come back as their mean.

    Example:
        >>> from kornia.augmentation.auto import TrivialAugment
        >>> policy = KorniaPolicy(TrivialAugment(), chunk_size=4)
        >>> tuple(policy(torch.rand(8, 1, 28, 28)).shape)
        (8, 1, 28, 28)
    """

    def __init__(self, policy: nn.Module, chunk_size: int = 16) -> None:
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}")
        self.policy, self.chunk_size = policy, chunk_size

    @override
    def forward(self, images: Tensor) -> Tensor:
        grey = images.shape[1] == 1
        rgb = images.expand(-1, 3, -1, -1) if grey else images
        out = torch.cat([self.policy(chunk.contiguous()) for chunk in rgb.split(self.chunk_size)])
        return (out.mean(1, keepdim=True) if grey else out).clamp(0, 1)


class UniformPerturbation:
    """Each sample gets a uniformly random operation of a perturbation bank at a uniformly random level.

    The ablation of *targeting*: the same operations the library draws from, without a weakness profile.
    Randomness comes from torch's global generator, which ``seed_everything`` fixes.

    Args:
        bank: an object with ``names`` and ``bank[name](images, severity: Tensor(B,), generator=None)``;
            default :func:`lightning_synth.perturbations.default_bank`.
        max_severity: levels are drawn uniformly from ``1..max_severity``.
    """

    def __init__(self, bank: Any | None = None, max_severity: int = 5) -> None:
        if bank is None:
            from lightning_synth.perturbations import default_bank

            bank = default_bank()
        if not list(getattr(bank, "names", [])):
            raise ValueError(f"`bank` must have a non-empty `names`, got {bank!r}")
        if max_severity < 1:
            raise ValueError(f"`max_severity` must be >= 1, got {max_severity}")
        self.bank, self.names, self.max_severity = bank, list(bank.names), max_severity

    def __call__(self, images: Tensor) -> Tensor:
        ops = torch.randint(len(self.names), (len(images),), device=images.device)
        levels = torch.randint(1, self.max_severity + 1, (len(images),), device=images.device)
        out = images.clone()
        for index, name in enumerate(self.names):
            rows = (ops == index).nonzero().squeeze(1)
            if rows.numel():
                out[rows] = self.bank[name](images[rows], levels[rows].to(images.dtype)).clamp(0, 1)
        return out


@dataclass(frozen=True)
class MethodContext:
    """What a method's hooks receive: the task, the seed and the fixed training budget.

    Attributes:
        task: ``"robustness"`` or ``"worst_group"``.
        seed: this run's seed (``seed_everything`` was called with it before any hook).
        in_channels, num_classes, image_size: shape of the task's data.
        batch_size, lr: shared by every method.
        epochs, steps_per_epoch, max_steps: the budget; ``max_steps = epochs * steps_per_epoch`` with
            ``steps_per_epoch = ceil(train_size / batch_size)`` from the real training set.
        train_size: real training samples.
        root_dir: scratch folder for this run (checkpoints of inner fits, e.g. JTT's first model).
        accelerator: Lightning accelerator used for every fit.
        width: channels of the shared network's first conv block (the same for every method).
        extras: task-specific helpers (see each benchmark: the worst-group task puts its group layout and
            a ``recolour`` scenario function here).
        info: free-form, JSON-serialisable facts a method reports; written to the results under ``info``.
    """

    task: str
    seed: int
    in_channels: int
    num_classes: int
    image_size: tuple[int, int]
    batch_size: int
    lr: float
    epochs: int
    steps_per_epoch: int
    max_steps: int
    train_size: int
    root_dir: Path
    accelerator: str = "auto"
    width: int = 32
    extras: Mapping[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def classifier(
        self,
        batch_transform: BatchTransform | None = None,
        objective: Objective | None = None,
        consistency: Callable[[Tensor], Sequence[Tensor]] | None = None,
        source_consistency: bool = False,
    ) -> Classifier:
        """The benchmarks' :class:`Classifier` for this task, with an optional transform/objective/consistency."""
        return Classifier(
            self.in_channels,
            self.num_classes,
            width=self.width,
            lr=self.lr,
            batch_transform=batch_transform,
            objective=objective,
            consistency=consistency,
            source_consistency=source_consistency,
        )


def classifier_factory(
    make_transform: Callable[[MethodContext], BatchTransform | None] | None = None,
    make_objective: Callable[[MethodContext], Objective | None] | None = None,
) -> Callable[[MethodContext], Classifier]:
    """A ``make_module`` hook building the shared :class:`Classifier` with a transform and/or objective."""

    def make(ctx: MethodContext) -> Classifier:
        transform = make_transform(ctx) if make_transform is not None else None
        objective = make_objective(ctx) if make_objective is not None else None
        return ctx.classifier(transform, objective)

    return make


def _no_callbacks(ctx: MethodContext, datamodule: L.LightningDataModule) -> list[Callback]:
    return []


def _same_datamodule(datamodule: L.LightningDataModule, ctx: MethodContext) -> L.LightningDataModule:
    return datamodule


@dataclass(frozen=True)
class Method:
    """A training method: how it differs from plain ERM, as hooks called once per (method, seed) run.

    Attributes:
        name: registry key, used in ``--methods``, result files and ``<export-dir>/<name>.pt``.
        tasks: the benchmarks it runs in (a subset of :data:`TASKS`).
        make_module: ``ctx -> Classifier``, called after ``wrap_datamodule``; use :func:`classifier_factory` or
            ``ctx.classifier(...)`` so the network and optimizer stay the shared ones (a subclass is fine).
        make_callbacks: ``(ctx, datamodule) -> list[Callback]`` added to the Trainer; ``datamodule`` is the
            one ``wrap_datamodule`` returned.
        wrap_datamodule: ``(datamodule, ctx) -> datamodule``; receives the task's real datamodule (not yet
            set up) and may return a wrapper (e.g. ``SyntheticDataModule``) or change it.
        trainer_kwargs: extra ``Trainer`` arguments (e.g. ``{"reload_dataloaders_every_n_epochs": 1}``);
            the step budget keys (``max_steps``, ``max_epochs``, ...) are refused.
        requires: modules that must import for the method to run; a method whose requirements are missing
            is skipped from the default method list (an explicit ``--methods`` entry fails instead).
        description: one line for the results JSON.
    """

    name: str
    tasks: tuple[str, ...] = TASKS
    make_module: Callable[[MethodContext], Classifier] = field(default_factory=classifier_factory)
    make_callbacks: Callable[[MethodContext, L.LightningDataModule], list[Callback]] = _no_callbacks
    wrap_datamodule: DatamoduleWrapper = _same_datamodule
    trainer_kwargs: Mapping[str, Any] = field(default_factory=dict)
    requires: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        name = self.name
        if not isinstance(name, str) or not name or "/" in name or name.strip() != name:
            raise ValueError(f"`name` must be a non-empty string without '/' or outer spaces, got {name!r}")
        unknown = [t for t in self.tasks if t not in TASKS]
        if isinstance(self.tasks, str) or unknown or not self.tasks:
            raise ValueError(f"`tasks` must be a non-empty tuple drawn from {TASKS}, got {self.tasks!r}")
        for hook in ("make_module", "make_callbacks", "wrap_datamodule"):
            if not callable(getattr(self, hook)):
                raise TypeError(f"`{hook}` must be callable, got {type(getattr(self, hook)).__name__}")
        reserved = sorted(RESERVED_TRAINER_KWARGS & set(self.trainer_kwargs))
        if reserved:
            raise ValueError(f"`trainer_kwargs` must not set the shared step budget, got keys {reserved}")

    def missing_requirements(self) -> list[str]:
        """The modules of ``requires`` that do not import."""
        missing = []
        for module in self.requires:
            try:
                importlib.import_module(module)
            except ImportError:
                missing.append(module)
        return missing


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method, *, overwrite: bool = False) -> Method:
    """Add ``method`` to the registry (``overwrite=True`` replaces one of the same name) and return it."""
    if not isinstance(method, Method):
        raise TypeError(f"`method` must be a Method, got {type(method).__name__}")
    if method.name in _REGISTRY and not overwrite and _REGISTRY[method.name] is not method:
        raise ValueError(f"`method` {method.name!r} is already registered; pass `overwrite=True` to replace")
    _REGISTRY[method.name] = method
    return method


def method_names(task: str | None = None, available_only: bool = False) -> list[str]:
    """Registered method names (in registration order), optionally only those of ``task`` that can run."""
    if task is not None and task not in TASKS:
        raise ValueError(f"`task` must be one of {TASKS} or None, got {task!r}")
    return [
        name
        for name, method in _REGISTRY.items()
        if (task is None or task in method.tasks) and not (available_only and method.missing_requirements())
    ]


def build_method(name: str, task: str | None = None) -> Method:
    """The registered :class:`Method` called ``name``, checked to run in ``task`` and to import.

    Raises:
        ValueError: if ``name`` is unknown or does not run in ``task``.
        ImportError: if a module the method requires does not import.

    Example:
        >>> build_method("erm").name
        'erm'
    """
    if name not in _REGISTRY:
        raise ValueError(f"`name` must be a registered method, one of {list(_REGISTRY)}, got {name!r}")
    method = _REGISTRY[name]
    if task is not None and task not in method.tasks:
        raise ValueError(f"Method {name!r} runs in tasks {method.tasks}, not in {task!r}")
    missing = method.missing_requirements()
    if missing:
        raise ImportError(f"Method {name!r} needs modules that do not import: {missing}")
    return method


def _trivialaugment(ctx: MethodContext) -> BatchTransform:
    from kornia.augmentation.auto import TrivialAugment

    return KorniaPolicy(TrivialAugment())


def _randaugment(ctx: MethodContext) -> BatchTransform:
    from kornia.augmentation.auto import RandAugment

    return KorniaPolicy(RandAugment(n=2, m=9))


def _uniform(ctx: MethodContext) -> BatchTransform:
    return UniformPerturbation()


register_method(Method("erm", description="empirical risk minimisation, no augmentation"))
register_method(
    Method(
        "trivialaugment",
        ("robustness",),
        classifier_factory(_trivialaugment),
        description="kornia TrivialAugment, one op per chunk of 16 samples",
    )
)
register_method(
    Method(
        "randaugment",
        ("robustness",),
        classifier_factory(_randaugment),
        description="kornia RandAugment(n=2, m=9), one draw per chunk of 16 samples",
    )
)
register_method(
    Method(
        "uniform",
        ("robustness",),
        classifier_factory(_uniform),
        requires=("lightning_synth.perturbations",),
        description="uniformly random op and level 1..5 of the library's bank, per sample",
    )
)


def context_from_args(
    args: argparse.Namespace, task: str, seed: int, train_size: int, root_dir: Path, in_channels: int,
    extras: Mapping[str, Any] | None = None,
) -> MethodContext:
    """The :class:`MethodContext` of one (method, seed) run of a 28x28, 10-class task, from the shared flags."""
    steps_per_epoch, max_steps = budget(train_size, args.batch_size, args.epochs)
    return MethodContext(
        task=task, seed=seed, in_channels=in_channels, num_classes=10, image_size=(28, 28),
        batch_size=args.batch_size, lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch,
        max_steps=max_steps, train_size=train_size, root_dir=root_dir, accelerator=args.accelerator,
        width=args.width, extras={**(extras or {}), "ladder_search": not args.no_ladder_search,
                                  "guided_search": not args.bisection_search},
    )


def machine_info() -> dict[str, Any]:
    """Facts about the machine a benchmark ran on, for its results file."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_default_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),  # kernels, so float results, follow it
        "lightning": L.__version__,
    }


def budget(train_size: int, batch_size: int, epochs: int) -> tuple[int, int]:
    """``(steps_per_epoch, max_steps)`` for a real training set of ``train_size`` samples."""
    steps_per_epoch = math.ceil(train_size / batch_size)
    return steps_per_epoch, epochs * steps_per_epoch


def fit(
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    *,
    max_steps: int,
    root_dir: Path,
    callbacks: Sequence[Callback] = (),
    accelerator: str = "auto",
    trainer_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """Train for exactly ``max_steps`` optimizer steps; returns ``{"train_seconds", "train_cpu_seconds", "steps"}``."""
    kwargs: dict[str, Any] = {
        "max_steps": max_steps,
        "max_epochs": -1,
        "accelerator": accelerator,
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": str(root_dir),
    }
    kwargs.update(trainer_kwargs or {})
    trainer = L.Trainer(callbacks=list(callbacks), **kwargs)
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit(module, datamodule=datamodule)
    return {
        "train_seconds": time.perf_counter() - start,
        "train_cpu_seconds": time.process_time() - cpu_start,  # all threads; steadier on a shared machine
        "steps": float(trainer.global_step),
    }


def run_method(
    method: Method, ctx: MethodContext, datamodule: L.LightningDataModule
) -> tuple[Classifier, dict[str, float]]:
    """Seed, apply the method's hooks and train; returns the trained module and ``{"train_seconds", ...}``."""
    L.seed_everything(ctx.seed, workers=True, verbose=False)
    datamodule = method.wrap_datamodule(datamodule, ctx)
    module = method.make_module(ctx)
    if not isinstance(module, Classifier):
        raise TypeError(f"Method {method.name!r}: `make_module` must return a Classifier, got {type(module)}")
    stats = fit(
        module,
        datamodule,
        max_steps=ctx.max_steps,
        root_dir=ctx.root_dir,
        callbacks=method.make_callbacks(ctx, datamodule),
        accelerator=ctx.accelerator,
        trainer_kwargs=method.trainer_kwargs,
    )
    return module, stats


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int = 1000) -> Tensor:
    """Predicted classes (CPU, int64) of ``images``: float in [0, 1] or uint8 (divided by 255)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds = []
    for chunk in images.split(batch_size):
        chunk = chunk.to(device)
        chunk = chunk.float().div(255) if chunk.dtype == torch.uint8 else chunk
        preds.append(model(chunk).argmax(1).cpu())
    model.train(was_training)
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def export_torchscript(module: Classifier, path: Path) -> Path:
    """Save ``module.net`` (eval, CPU) as TorchScript: images in [0, 1] -> logits; no other dependency."""
    net = copy.deepcopy(module.net).cpu().eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated but asked for here
        torch.jit.script(net).save(str(path))
    return path


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std", "values"}`` (sample std; 0 for one value)."""
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values) if values else float("nan"), "std": std, "values": values}


def pm(stats: Mapping[str, Any], scale: float = 100.0) -> str:
    """``"mean ± std"`` in percent."""
    return f"{scale * stats['mean']:.1f} ± {scale * stats['std']:.1f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table with aligned columns."""
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows, strict=True)]
    lines = [" | ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def git_info() -> dict[str, Any]:
    """The commit the benchmark ran from and whether the work tree was clean (tracked files only)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit or None, "tree_clean": (not dirty) if commit else None}


def write_json(path: Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as indented JSON, creating the folder, with the git commit and tree state added."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**git_info(), **payload}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_PLUGINS = ("benchmarks.methods",)
"""Imported by both scripts before methods are resolved: the place for the lead's method registrations."""


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark script shares (methods, seeds, budget, data sizes, outputs)."""
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="registered method names (default: every method of this task that imports)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3, help="budget in epochs of the real training set")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--width", type=int, default=32, help="channels of the shared CNN's first conv block")
    parser.add_argument("--train-size", type=int, default=None, help="cap on real training samples")
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--test-size", type=int, default=None, help="cap on test samples")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--no-ladder-search", action="store_true",
                        help="lightning_synth's analyzer scores every planned cell on every probe sample (its probing "
                             "before the ladder search: reproduces the rows measured before it)")
    parser.add_argument("--bisection-search", action="store_true",
                        help="lightning_synth's ladder search bisects each ladder, unguided by the last counts and "
                             "exact cells (the search before session 10: reproduces the rows measured with it)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--plugins",
        nargs="*",
        default=list(DEFAULT_PLUGINS),
        help="modules to import first, which call `register_method` (default: benchmarks.methods if present)",
    )
    parser.add_argument(
        "--export-dir",
        type=Path,
        default=None,
        help="write each method's first-seed classifier as TorchScript to DIR/<method>.pt",
    )


def load_plugins(modules: Sequence[str]) -> None:
    """Import ``modules`` (each registers its methods); a missing default plugin module is skipped."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if module in DEFAULT_PLUGINS and error.name == module:
                continue
            raise


def check_common_args(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` naming the first bad shared option."""
    positive = {"--epochs": args.epochs, "--batch-size": args.batch_size, "--val-size": args.val_size}
    positive |= {"--width": args.width}
    positive |= {"--train-size": args.train_size, "--test-size": args.test_size}
    for flag, value in positive.items():
        if value is not None and value < 1:
            raise ValueError(f"`{flag}` must be >= 1, got {value}")
    if not args.lr > 0:
        raise ValueError(f"`--lr` must be > 0, got {args.lr}")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"`--seeds` must be distinct integers, got {args.seeds}")
    if args.methods is not None and len(set(args.methods)) != len(args.methods):
        raise ValueError(f"`--methods` must not repeat a name, got {args.methods}")
    load_plugins(args.plugins)


def resolve_methods(
    names: Sequence[str] | None, task: str, overrides: Mapping[str, Method] | None = None
) -> list[Method]:
    """The methods to run: ``names`` (checked) or every available method of ``task``.

    ``overrides`` replaces registered methods by name for this run (e.g. JTT built with CLI settings).
    """
    overrides = overrides or {}
    if names is None:
        skipped = [n for n in method_names(task) if n not in method_names(task, available_only=True)]
        if skipped:
            print(f"skipping methods whose requirements do not import: {skipped}")
        names = method_names(task, available_only=True)
    return [overrides[name] if name in overrides else build_method(name, task) for name in names]


def quiet_lightning() -> None:
    """Silence Lightning's per-fit banners and known harmless warnings: the output stays readable."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    for message in (".*does not have many workers.*", ".*LeafSpec.*", ".*torch.jit.*"):
        warnings.filterwarnings("ignore", message=message)
