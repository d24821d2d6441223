"""Exploration plugin (issue 10, session 12): mixing-chain views of the real or of the synthetic samples only.

The ``lightning_synth`` row makes Jensen-Shannon views of every batch image, synthetic ones included (bank
perturbations of real images, views of which chain more perturbations on top). ``ls_real_views`` asks the
datamodule for each sample's real source (``deliver_source=True``; a real sample's source is itself), keeps
cross-entropy on every sample as the row does, and makes the views of the real samples only: about 2.3 forward
passes per batch instead of 3 at the default synthetic share. ``ls_synth_views`` makes them of the synthetic
samples only (about 1.6 passes). Everything else is the ``lightning_synth`` row.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from benchmarks.common import Classifier, Method, MethodContext, register_method
from benchmarks.methods import lightning_synth_method
from lightning_synth.consistency import jsd_consistency


class RealViewsClassifier(Classifier):
    """:class:`Classifier` for ``(x, y, source)`` batches: cross-entropy on all, views of the real rows only
    (``views_of="real"``) or of the synthetic rows only (``"synthetic"``)."""

    views_of = "real"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.real_counts: list[tuple[int, int]] = []  # (real rows, rows) of each training batch

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        images, targets, sources = batch[0], batch[1], batch[-1]
        real = (sources == images).flatten(1).all(1)
        rows = real if self.views_of == "real" else ~real
        with torch.no_grad():
            views = list(self.consistency(images[rows])) if bool(rows.any()) else []
        logits = self(torch.cat([images, *views]))
        clean, rest = logits[: len(images)], logits[len(images):].chunk(len(views)) if views else []
        losses = F.cross_entropy(clean, targets, reduction="none")
        loss = losses.mean()
        if views:
            loss = loss + self.consistency_weight * jsd_consistency(clean[rows], *rest)
        self.log("train/loss", loss, prog_bar=False)
        self.real_counts.append((int(real.sum()), len(real)))
        return {"loss": loss, "per_sample_loss": losses.detach()}


class RecordRealShare(Callback):
    """Writes the share of real rows in the training batches to the run's ``info`` at the end of training."""

    def __init__(self, module: RealViewsClassifier, info: dict[str, Any]) -> None:
        self.module, self.info = module, info

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        real, rows = (sum(c) for c in zip(*self.module.real_counts, strict=True))
        self.info["real_share"] = round(real / rows, 4)


def variant(name: str, views_of: str) -> Method:
    base = lightning_synth_method(name, gan=False, consistency=True,
                                  description=f"{name}: views of {views_of} samples only")
    make_module, wrap, make_callbacks = base.make_module, base.wrap_datamodule, base.make_callbacks
    modules: dict[int, RealViewsClassifier] = {}
    cls = type(f"{views_of.title()}ViewsClassifier", (RealViewsClassifier,), {"views_of": views_of})

    def module(ctx: MethodContext) -> Classifier:
        made = make_module(ctx)
        out = cls(ctx.in_channels, ctx.num_classes, width=ctx.width, lr=ctx.lr, consistency=made.consistency,
                  consistency_weight=made.consistency_weight)
        out.net.load_state_dict(made.net.state_dict())  # the same initial weights as the row's
        modules[ctx.seed] = out
        return out

    def callbacks(ctx: MethodContext, dm: L.LightningDataModule) -> list[Callback]:
        return [*make_callbacks(ctx, dm), RecordRealShare(modules[ctx.seed], ctx.info)]

    def datamodule(dm: L.LightningDataModule, ctx: MethodContext) -> L.LightningDataModule:
        wrapped = wrap(dm, ctx)
        wrapped.deliver_source = True  # before setup: the mixed dataset is built there
        return wrapped

    return dataclasses.replace(base, make_module=module, wrap_datamodule=datamodule, make_callbacks=callbacks)


register_method(variant("ls_real_views", "real"), overwrite=True)
register_method(variant("ls_synth_views", "synthetic"), overwrite=True)
