"""Exploration plugin (issue 10, session 12): a smaller synthetic share, for the last epoch or throughout.

The defaults' synthetic samples (bank perturbations with cross-entropy on their labels) buy impulse-noise
robustness and cost clean accuracy (lightning_synth vs AugMix, 20 seeds: +3.5 impulse noise, -0.3 to -1.0 on
every other corruption, -0.5 clean). These variants pin ``synthetic_weight`` through the run's controller for
the final epoch, so the last epoch is real data with the mixing-chain consistency (as AugMix) after the
synthetic epochs. ``ls_weight_040`` and ``ls_weight_020`` start the synthetic weight at 0.4 and 0.2 instead
of 0.75 (it then follows the weighting's feedback as usual).

Session 13: at six epochs AugMix led the defaults on the validation corruptions (three seeds), so
``ls_real_second_half`` pins the weight to 0 from the middle epoch on: the synthetic epochs first, then real
data with the mixing-chain consistency only, as AugMix trains throughout.

Session 14: that did not close the gap, and neither did the untargeted loops, so ``uss_real_only`` pins the
weight to 0 before the first epoch in ``uniform_share_sampler``: AugMix's chains and consistency on real data
with the loss-focused sampler and nothing synthetic. Beside AugMix it separates the sampler from the synthetic
share as the cause; ``us_real_only``, the same with uniform draws (``uniform_share`` pinned to 0), is AugMix
fed through ``SyntheticDataModule``: the control for that comparison.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from benchmarks.common import Method, MethodContext, register_method
from benchmarks.methods import lightning_synth_method
from lightning_synth._validation import check_int


class WeightFromEpoch(Callback):
    """Queue ``synthetic_weight=weight`` at the end of epoch ``from_epoch - 1`` (at the start of training for
    ``from_epoch=0``; applied at the next sync, so epochs ``from_epoch`` on train with it); records each epoch's
    synthetic sampler mass in ``info``."""

    def __init__(self, datamodule: Any, from_epoch: int, weight: float, info: dict[str, Any]) -> None:
        check_int("from_epoch", from_epoch, 0)
        self.datamodule, self.from_epoch, self.weight, self.info = datamodule, from_epoch, weight, info

    def _pin(self) -> None:
        self.datamodule.controller.update(synthetic_weight=self.weight, source="exploration")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.from_epoch == 0:  # before the first epoch's refresh, whose sync applies it
            self._pin()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if batch_idx == 0:  # the synthetic mass of this epoch's draw, for the record
            mass = self.datamodule.engine.sampler.group_mass()
            share = sum(v for k, v in mass.items() if k.startswith("synthetic/"))
            self.info.setdefault("synthetic_mass_by_epoch", []).append(round(float(share), 4))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.from_epoch - 1:
            self._pin()


def variant(name: str, weight: float, when: str = "last epoch", **options: Any) -> Method:
    """``lightning_synth_method(name, **options)`` with the synthetic weight pinned to ``weight`` from the
    ``when`` (``"last epoch"``, ``"second half"`` or ``"start"``) on."""
    starts = {"last epoch": lambda epochs: epochs - 1, "second half": lambda epochs: epochs // 2,
              "start": lambda epochs: 0}
    if when not in starts:
        raise ValueError(f"`when` must be one of {sorted(starts)}, got {when!r}")
    base = lightning_synth_method(name, **{"gan": False, "consistency": True, **options},
                                  description=f"{name}: {when} weight {weight}")
    make = base.make_callbacks

    def callbacks(ctx: MethodContext, datamodule: L.LightningDataModule) -> list[Callback]:
        return [*make(ctx, datamodule), WeightFromEpoch(datamodule, starts[when](ctx.epochs), weight, ctx.info)]

    return dataclasses.replace(base, make_callbacks=callbacks)


register_method(variant("ls_real_last", 0.0), overwrite=True)
register_method(variant("ls_half_last", 0.375), overwrite=True)
register_method(variant("ls_real_second_half", 0.0, when="second half"), overwrite=True)
register_method(variant("uss_real_only", 0.0, when="start", targeted=False, untargeted_sampler=True), overwrite=True)
register_method(variant("us_real_only", 0.0, when="start", targeted=False), overwrite=True)
register_method(lightning_synth_method("ls_uniform_draws", gan=False, consistency=True, adaptive=False,
                                      description="ls_uniform_draws: the defaults with uniform draws"), overwrite=True)
register_method(lightning_synth_method("ls_weight_040", gan=False, consistency=True, weight=0.4,
                                      description="ls_weight_040: initial synthetic weight 0.4"), overwrite=True)
register_method(lightning_synth_method("ls_weight_020", gan=False, consistency=True, weight=0.2,
                                      description="ls_weight_020: initial synthetic weight 0.2"), overwrite=True)
