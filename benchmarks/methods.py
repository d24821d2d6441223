"""The lightning_synth methods of the benchmarks: the full system and its ablations.

Imported by ``benchmarks/robustness.py`` and ``benchmarks/worst_group.py`` before ``--methods`` is resolved.
Every variant trains the shared :class:`~benchmarks.common.Classifier` under the same step budget; it differs
only in the callbacks it adds and the :class:`~lightning_synth.data.SyntheticDataModule` it wraps around the
task's real datamodule.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
from lightning.pytorch.callbacks import Callback

from benchmarks.common import Method, MethodContext, register_method
from lightning_synth.callbacks import AdaptiveSampling, FailureModeCallback
from lightning_synth.data import SyntheticDataModule
from lightning_synth.generators import (
    ConditionalGAN,
    ConditionalGANGenerator,
    ScenarioGenerator,
    SyntheticGenerator,
    TargetedAugmentation,
)

__all__ = ["lightning_synth_method"]

REQUIRES = ("lightning_synth.callbacks", "lightning_synth.data", "lightning_synth.generators")


def _generators(ctx: MethodContext, gan: bool, scenarios: bool) -> list[SyntheticGenerator]:
    if ctx.task == "worst_group":
        # The failure here is a slice failure (class x colour): scenario generation realises the weak slices
        # with the task's re-colouring scenario; perturbations and a GAN of the biased data do not address it.
        return [ScenarioGenerator(scenarios=ctx.extras.get("scenarios"), mix={"slice": 1.0})]
    generators: list[SyntheticGenerator] = [TargetedAugmentation(class_bias=0.5)]
    if scenarios:
        generators.append(ScenarioGenerator(scenarios=ctx.extras.get("scenarios")))
    if gan:
        model = ConditionalGAN(num_classes=ctx.num_classes, image_size=ctx.image_size[0], channels=ctx.in_channels)
        generators.append(ConditionalGANGenerator(model, train_steps=100, min_quality=0.1))
    return generators


def lightning_synth_method(
    name: str, gan: bool = True, scenarios: bool = True, adaptive: bool = True, description: str = ""
) -> Method:
    """A lightning_synth variant: which generators it uses and whether the sampler adapts."""

    def wrap(datamodule: L.LightningDataModule, ctx: MethodContext) -> L.LightningDataModule:
        # Robustness: a third of the real set's size is generated anew per epoch, the pool keeps about two
        # refreshes, and the synthetic share starts at 3/4 of its loss-driven mass (at 1/2 with a quarter, clean
        # accuracy held but robustness trailed the uniform-bank baseline). Worst group: half, at full mass.
        worst_group = ctx.task == "worst_group"
        budget = max(256, ctx.train_size // (2 if worst_group else 3))
        # The datamodule owns the sampler; a huge temperature makes its weights uniform (the ablation).
        return SyntheticDataModule(
            datamodule, generators=_generators(ctx, gan, scenarios), synthetic_budget=budget,
            max_pool_samples=2 * budget, real_cache_size=8192, initial_synthetic_weight=1.0 if worst_group else 0.75,
            seed=ctx.seed,
            sampler_temperature=2.0 if adaptive else 1e6, sampler_uniform_mix=0.2,
        )

    def callbacks(ctx: MethodContext, datamodule: L.LightningDataModule) -> list[Callback]:
        groups = int(ctx.extras.get("num_groups", 64))  # the worst-group task has 100 (class, colour) groups
        return [FailureModeCallback(max_samples=256, seed=ctx.seed, max_groups=groups), AdaptiveSampling(seed=ctx.seed)]

    return Method(name, make_callbacks=callbacks, wrap_datamodule=wrap, requires=REQUIRES,
                  description=description or name)


VARIANTS: list[tuple[str, Callable[[], Method]]] = [
    ("lightning_synth", lambda: lightning_synth_method(
        "lightning_synth", description="full system: targeted augmentation + scenarios + GAN, adaptive sampling")),
    ("ls_no_gan", lambda: lightning_synth_method("ls_no_gan", gan=False, description="ablation: without the GAN")),
    ("ls_no_adaptive", lambda: lightning_synth_method(
        "ls_no_adaptive", adaptive=False, description="ablation: uniform sampling over real + synthetic")),
    ("ls_no_scenarios", lambda: lightning_synth_method(
        "ls_no_scenarios", scenarios=False, description="ablation: without scenario generation")),
]

for _name, _make in VARIANTS:
    register_method(_make(), overwrite=True)
