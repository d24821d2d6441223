"""Helpers of :class:`~lightning_synth.callbacks.FailureModeCallback`: where the validation data and the clean
logits come from, which inputs can be probed, in which range, and what an analysis logs."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, get_args

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.data import DistributedSampler
from torch.utils.hooks import RemovableHandle

from lightning_synth._validation import check_choice
from lightning_synth.batch import BatchView
from lightning_synth.profile import WeaknessProfile
from lightning_synth.value_range import ValueRange

__all__ = ["LogitsFn", "LogitsTap", "PaddingFilter", "ProbeLayout", "gathered_value_range", "is_image_batch",
           "profile_metrics"]

LogitsFn = Callable[[L.LightningModule, Tensor], Tensor]
ProbeLayout = Literal["auto", "channels_last", "preserve"]


def _default_logits(module: L.LightningModule, inputs: Tensor) -> Tensor:
    return module(inputs)


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


def is_image_batch(inputs: Any) -> bool:
    """Whether ``inputs`` are images ``(B, C, H, W)`` that the perturbation bank can perturb.

    Example:
        >>> is_image_batch(torch.zeros(2, 3, 8, 8)), is_image_batch(torch.zeros(2, 64))
        (True, False)
    """
    return isinstance(inputs, Tensor) and inputs.ndim == 4 and inputs.shape[1] in (1, 3, 4) and min(
        inputs.shape[-2:]) >= 3


def gathered_value_range(trainer: L.Trainer, inputs: Tensor) -> ValueRange:
    """The range of ``inputs``, widened to the inputs of every rank (a collective: call it on every rank)."""
    if inputs.is_floating_point():
        local = torch.stack([inputs.detach().min(), inputs.detach().max()]).double().reshape(1, 2)
        both = trainer.strategy.all_gather(local).reshape(-1, 2).cpu()  # same range on every rank
        low, high = float(both[:, 0].min()), float(both[:, 1].max())
        return ValueRange.detect(torch.tensor([low, high], dtype=inputs.dtype))
    return ValueRange.detect(inputs[:1])


def profile_metrics(profile: WeaknessProfile, slice_keys: Iterable[str], recall: Mapping[str, Any]) -> dict[str, float]:
    """The scalars an analysis logs: gaps, clean error, frontiers, worst group accuracy per slice, class recall."""
    metrics = {f"weakness/{w.key}": w.gap for w in profile.weaknesses if w.kind != "confusion"}
    metrics["weakness/clean_error"] = profile.clean_error
    for name, sev in profile.frontier.items():
        metrics[f"weakness/frontier/{name}"] = float("nan") if sev is None else sev
    for key in sorted(slice_keys):
        accs = [1 - w.error_rate for w in profile.by_kind("slice") if w.name.startswith(f"{key}=")]
        if accs:
            metrics[f"weakness/worst_group_acc/{key}"] = min(accs)
    metrics.update({k: float(v) for k, v in recall.items()})
    return metrics


class PaddingFilter:
    """Which samples of one pass count: not an ignore label, not a padding repeat of the distributed sampler
    (local position ``p`` on rank ``r`` is global position ``p * W + r``).

    Example:
        >>> padding = PaddingFilter(dataset_len=5)  # 5 samples on 2 ranks: rank 1 gets one repeat
        >>> padding.keep(torch.tensor([3, -100, 1]), ignore_index=-100, world=2, rank=1).tolist()
        [True, False, False]
    """

    def __init__(self, dataset_len: int | None = None) -> None:
        self.dataset_len, self.position = dataset_len, 0

    def keep(self, targets: Tensor, ignore_index: int, world: int, rank: int) -> Tensor:
        keep = (targets != ignore_index).cpu()
        if self.dataset_len is not None:
            positions = torch.arange(self.position, self.position + len(targets)) * world + rank
            keep &= positions < self.dataset_len
        self.position += len(targets)
        return keep


class LogitsTap:
    """The clean logits of a validation batch: what ``validation_step`` returned (``{'logits': ...}``), else the
    output of the model's forward (seen by a forward hook), else one extra forward (warned once); and the logits
    of probe images, in the memory layout ``probe_layout`` asks for (see :meth:`probe`)."""

    def __init__(self, probe_layout: ProbeLayout = "auto") -> None:
        check_choice("probe_layout", probe_layout, get_args(ProbeLayout))
        self.captured: Tensor | None = None
        self.probe_layout = probe_layout
        self._capturing = False
        self._hook: RemovableHandle | None = None
        self._warned_extra_forward = False
        self._layout_failed = False  # "auto": the model's forward failed on channels-last images

    def state_dict(self) -> dict[str, Any]:
        """Whether the model's forward failed on channels-last probe images (a resumed run keeps the fallback)."""
        return {"layout_failed": self._layout_failed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._layout_failed = bool(state_dict.get("layout_failed", False))

    def attach(self, pl_module: L.LightningModule) -> None:
        self.remove()
        self._hook = pl_module.register_forward_hook(self._capture)

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _capture(self, module: Any, args: Any, output: Any) -> None:
        if not self._capturing and isinstance(output, Tensor):
            self.captured = output

    def from_step(self, outputs: Any, view: BatchView, pl_module: L.LightningModule, logits_fn: LogitsFn) -> Tensor:
        n = len(view.targets)
        if isinstance(outputs, dict):
            for key in ("logits", "preds", "outputs"):
                value = outputs.get(key)
                if isinstance(value, Tensor) and value.ndim in (1, 2) and value.shape[0] == n:
                    return _as_class_logits(value)
        captured = self.captured
        if captured is not None and captured.ndim in (1, 2) and captured.shape[0] == n:
            return _as_class_logits(captured)
        if not self._warned_extra_forward:
            self._warned_extra_forward = True
            rank_zero_warn(
                "FailureModeCallback could not see the logits of `validation_step` (it neither called "
                "`self(x)` nor returned {'logits': ...}), so it runs one extra forward per validation batch. "
                "Return `{'logits': logits}` from `validation_step` to avoid it."
            )
        return self.forward(pl_module, view.inputs, logits_fn)

    def probe(self, pl_module: L.LightningModule, inputs: Tensor, logits_fn: LogitsFn) -> Tensor:
        """Logits of probe images: channels-last with ``"channels_last"``, and with ``"auto"`` on the CPU
        (oneDNN's convolutions and max pooling run faster so: 1.6x for the demo's CNN, one thread), falling
        back for good, warned once, if the model's forward fails on them (a ``view`` that needs contiguous
        memory); ``"preserve"``: as they come."""
        if self.probe_layout == "preserve" or self._layout_failed or inputs.ndim != 4 or (
                self.probe_layout == "auto" and inputs.device.type != "cpu"):
            return self.forward(pl_module, inputs, logits_fn)
        try:
            return self.forward(pl_module, inputs.to(memory_format=torch.channels_last), logits_fn)
        except RuntimeError as err:
            if self.probe_layout == "channels_last":
                raise
            self._layout_failed = True
            rank_zero_warn(f"FailureModeCallback: the model's forward failed on channels-last probe images ({err}); "
                           "probes keep the images' own memory layout from now on (`probe_layout='preserve'`).")
        return self.forward(pl_module, inputs, logits_fn)

    def forward(self, pl_module: L.LightningModule, inputs: Tensor, logits_fn: LogitsFn) -> Tensor:
        """``(B, C)`` logits of ``inputs`` in the model's own precision, not captured as the step's logits."""
        self._capturing = True
        try:
            trainer = pl_module._trainer
            if trainer is not None:
                with trainer.precision_plugin.forward_context():  # the model's own precision
                    logits = logits_fn(pl_module, inputs)
            else:
                logits = logits_fn(pl_module, inputs)
        finally:
            self._capturing = False
        if not isinstance(logits, Tensor) or logits.ndim not in (1, 2):
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise TypeError(
                f"FailureModeCallback expected (batch, classes) logits from the model, got {got}. "
                "Pass `logits_fn=lambda module, x: ...` returning logits."
            )
        return _as_class_logits(logits)
