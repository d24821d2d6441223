"""The lightning_synth methods of the benchmarks: the full system and its ablations.

Imported by ``benchmarks/robustness.py`` and ``benchmarks/worst_group.py`` before ``--methods`` is resolved.
Every variant trains the shared :class:`~benchmarks.common.Classifier` under the same step budget; it differs
only in the callbacks it adds and the :class:`~lightning_synth.data.SyntheticDataModule` it wraps around the
task's real datamodule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.common import Classifier, Method, MethodContext, UniformPerturbation, register_method
from lightning_synth.callbacks import AdaptiveSampling, FailureModeCallback
from lightning_synth.consistency import MixingChains
from lightning_synth.data import SyntheticDataModule
from lightning_synth.generators import (
    ConditionalGAN,
    ConditionalGANGenerator,
    ScenarioGenerator,
    SyntheticGenerator,
    TargetedAugmentation,
)
from lightning_synth.generators.base import GenerationContext, SyntheticBatch
from lightning_synth.irreducible import IrreducibleLoss
from lightning_synth.perturbations import PerturbationBank, default_bank
from lightning_synth.profile import WeaknessProfile

__all__ = ["UniformBank", "augmix_method", "bank_names", "lightning_synth_method", "uniform_method"]

REQUIRES = ("lightning_synth.callbacks", "lightning_synth.data", "lightning_synth.generators")


class UniformBank(SyntheticGenerator):
    """The bank at random: each sample a uniformly random real image, perturbation and level 1..5.

    The generator of ``uniform_share``: lightning_synth's pool, share and budget without any targeting.
    """

    name = "uniform_bank"

    def __init__(self, perturbations: Sequence[str] | None = None) -> None:
        self.bank = PerturbationBank(perturbations)

    def generate(self, profile: WeaknessProfile, budget: int, context: GenerationContext) -> SyntheticBatch:
        if budget == 0:
            return SyntheticBatch.empty(self.name, context.real_inputs)
        sources = context.sample_rows(budget)
        images, labels = context.real_rows(sources), context.real_targets[sources]
        ops = torch.randint(len(self.bank), (budget,), generator=context.generator)
        levels = torch.randint(1, 6, (budget,), generator=context.generator)
        out, keys = images.clone(), [""] * budget
        for index, name in enumerate(self.bank.names):
            rows = (ops == index).nonzero().squeeze(1)
            if rows.numel():
                out[rows] = self.bank[name](images[rows], levels[rows].float(), context.generator)
                for r in rows.tolist():
                    keys[r] = f"perturbation/{name}@{int(levels[r])}"
        return SyntheticBatch(out, labels.long(), keys, torch.ones(budget), self.name, source_index=sources)


def bank_names(ctx: MethodContext) -> list[str] | None:
    """The perturbations a method may train on: all (``None``) or the bank without a left-out family."""
    excluded = set(ctx.extras.get("exclude_perturbations", ()))
    return [n for n in default_bank().names if n not in excluded] if excluded else None


def _generators(ctx: MethodContext, gan: bool, scenarios: bool, targeted: bool, class_bias: float | None,
                uniform_floor: float | None) -> list[SyntheticGenerator]:
    if ctx.task == "worst_group":
        # The failure here is a slice failure (class x colour): scenario generation realises the weak slices
        # with the task's re-colouring scenario; perturbations and a GAN of the biased data do not address it.
        return [ScenarioGenerator(scenarios=ctx.extras.get("scenarios"), mix={"slice": 1.0})]
    names = bank_names(ctx)
    if not targeted:
        return [UniformBank(names)]
    kwargs: dict[str, float] = {}
    if class_bias is not None:
        kwargs["class_bias"] = class_bias
    if uniform_floor is not None:
        kwargs["uniform_floor"] = uniform_floor
    generators: list[SyntheticGenerator] = [TargetedAugmentation(names, **kwargs)]
    if scenarios:
        generators.append(ScenarioGenerator(names, scenarios=ctx.extras.get("scenarios")))
    if gan:
        model = ConditionalGAN(num_classes=ctx.num_classes, image_size=ctx.image_size[0], channels=ctx.in_channels)
        generators.append(ConditionalGANGenerator(model, train_steps=100, min_quality=0.1))
    return generators


def lightning_synth_method(
    name: str, gan: bool = True, scenarios: bool = False, adaptive: bool = True, description: str = "",
    targeted: bool = True, consistency: bool = False, budget_fraction: float = 1 / 3, weight: float = 0.75,
    class_bias: float | None = None, floor: float | None = None, uniform_floor: float | None = None,
    reducible: bool = False, untargeted_sampler: bool = False, source: bool = False,
    chains_class: type[MixingChains] = MixingChains,
) -> Method:
    """A lightning_synth variant; every argument left at its default keeps the library's default.

    Args:
        gan, scenarios: add those generators to the default ``TargetedAugmentation``.
        adaptive: loss-focused sampling (the datamodule's default, ``sampler_uniform_mix=0.2``); ``False``
            draws uniformly (``1.0``), as every untargeted variant does.
        targeted: ``False`` removes every use of the profile (uniform bank generator, untargeted chains): the
            ``uniform_share`` ablation.
        consistency: Jensen-Shannon consistency on mixing-chain views of each batch
            (:class:`~lightning_synth.consistency.MixingChains`, targeted with uniform ``floor``).
        budget_fraction: synthetic samples per refresh as a fraction of the real training set (pool 2x).
        weight: initial synthetic weight.
        class_bias, uniform_floor: ``TargetedAugmentation``'s (``None``: its defaults).
        floor: ``MixingChains``' uniform floor (``None``: its default).
        untargeted_sampler: with ``targeted=False``, keep the loss-focused sampler (the ablation that leaves
            only the profile's targeting out).
        source: consistency with the real source (``SyntheticDataModule(deliver_source=True)``: cross-entropy
            on each sample's source, Jensen-Shannon between source and sample; 2 forward passes); with
            ``consistency``, one mixing-chain view of each source joins the Jensen-Shannon term (3 passes).
        reducible: with ``adaptive``, the sampler weighs reducible loss
            (``AdaptiveSampling(irreducible=IrreducibleLoss(...))``, trained on the validation split).
        chains_class: with ``consistency``, the :class:`~lightning_synth.consistency.MixingChains` (sub)class
            that makes the views (an exploration plugin's variant).
    """

    def wrap(datamodule: L.LightningDataModule, ctx: MethodContext) -> L.LightningDataModule:
        worst_group = ctx.task == "worst_group"
        # Only what differs from SyntheticDataModule's defaults is passed, so the `lightning_synth` row is the
        # README quick start (budget 1/3 of the training set, pool twice that, weight 0.75, adaptive sampler).
        kwargs: dict[str, Any] = {}
        if worst_group or budget_fraction != 1 / 3:
            kwargs["synthetic_budget"] = 0.5 if worst_group else budget_fraction
        if worst_group or weight != 0.75:
            kwargs["initial_synthetic_weight"] = 1.0 if worst_group else weight
        if not (adaptive and (targeted or untargeted_sampler)):  # the datamodule's sampler default focuses on losses
            kwargs["sampler_uniform_mix"] = 1.0
        if source:
            kwargs["deliver_source"] = True
        generators = _generators(ctx, gan, scenarios, targeted, class_bias, uniform_floor)
        return SyntheticDataModule(datamodule, generators=generators, seed=ctx.seed, **kwargs)

    # What make_module and make_callbacks of one run share (the analyzer, the chains): one run is one
    # MethodContext, so a new context starts afresh. Keyed by seed, a leave-one-family-out run reused the main
    # run's analyzer, probing the family it leaves out, with the state of the runs before it.
    run: dict[str, Any] = {}

    def run_state(ctx: MethodContext) -> dict[str, Any]:
        if run.get("ctx") is not ctx:
            run.clear()
            run["ctx"] = ctx
        return run

    def analyzer(ctx: MethodContext) -> FailureModeCallback:
        state = run_state(ctx)
        if "analyzer" not in state:
            groups = int(ctx.extras.get("num_groups", 64))  # the worst-group task has 100 (class, colour) groups
            state["analyzer"] = FailureModeCallback(bank_names(ctx), max_samples=256, seed=ctx.seed,
                                                    max_groups=groups,
                                                    ladder_search=bool(ctx.extras.get("ladder_search", True)))
            state["analyzer"].prober.guided_search = bool(ctx.extras.get("guided_search", True))
        return state["analyzer"]

    def make_module(ctx: MethodContext) -> Classifier:
        if not consistency:
            return ctx.classifier(source_consistency=source)
        # untargeted: plain AugMix chains; targeted: the analyzer's tilt, at MixingChains' floor unless given
        options: dict[str, Any] = {"analyzer": analyzer(ctx)} if targeted else {"floor": 1.0}
        if targeted and floor is not None:
            options["floor"] = floor
        if source:  # one chain view of each source joins the source and the sample: 3 passes, as the chains alone
            options["num_views"] = 1
        chains = run_state(ctx)["chains"] = chains_class(bank_names(ctx), **options)
        return ctx.classifier(consistency=chains, source_consistency=source)

    def callbacks(ctx: MethodContext, datamodule: L.LightningDataModule) -> list[Callback]:
        out: list[Callback] = [analyzer(ctx)] if targeted else []
        irreducible = IrreducibleLoss(perturbations=bank_names(ctx), seed=ctx.seed) if reducible else None
        out.append(AdaptiveSampling(seed=ctx.seed, irreducible=irreducible))
        if consistency and targeted:
            out.append(run_state(ctx)["chains"])
        return out

    return Method(name, make_module=make_module, make_callbacks=callbacks, wrap_datamodule=wrap,
                  requires=REQUIRES, description=description or name)


def augmix_method(name: str = "augmix", description: str = "") -> Method:
    """AugMix on the library's bank: mixing chains (width 3, depth 1-3, per-sample ops) + JSD (weight 12)."""

    def make_module(ctx: MethodContext) -> Classifier:
        return ctx.classifier(consistency=MixingChains(bank_names(ctx), floor=1.0))

    return Method(name, ("robustness",), make_module=make_module, requires=("lightning_synth.consistency",),
                  description=description or "AugMix on the bank: mixing chains + JSD consistency, 3 passes")


def uniform_method(name: str = "uniform") -> Method:
    """The bank on every sample: a uniformly random op and level 1..5 per sample."""

    def make_module(ctx: MethodContext) -> Classifier:
        names = bank_names(ctx)
        return ctx.classifier(UniformPerturbation(None if names is None else PerturbationBank(names)))

    return Method(name, ("robustness",), make_module=make_module, requires=("lightning_synth.perturbations",),
                  description="uniformly random op and level 1..5 of the library's bank, per sample")


VARIANTS: list[tuple[str, Callable[[], Method]]] = [
    ("uniform", uniform_method),
    ("augmix", augmix_method),
    # The row a user gets from the README quick start: the default generator and sampler, plus the opt-in
    # consistency objective (MixingChains views of each batch, JSD; 3 forward passes). The defaults (targeted
    # generator with a 0.8 uniform floor and no class bias, no scenario generator, chains with a 0.9 floor:
    # chosen on the validation corruptions, seeds 0-1; then the loss-focused sampler, seeds 0-2) were the best
    # configuration measured there.
    ("lightning_synth", lambda: lightning_synth_method(
        "lightning_synth", gan=False, consistency=True,
        description="defaults (targeted generator, 0.8 uniform floor) + targeted mixing-chain JSD consistency")),
    ("ls_gan", lambda: lightning_synth_method(
        "ls_gan", gan=True, consistency=True,
        description="ablation: the defaults + ConditionalGANGenerator (trained in the loop, 100 steps per refresh; "
                    "its samples join the pool beside the targeted generator's)")),
    ("ls_strong_targeting", lambda: lightning_synth_method(
        "ls_strong_targeting", gan=False, consistency=True, scenarios=True, adaptive=True, class_bias=0.5,
        uniform_floor=0.0, floor=0.5,
        description="ablation: the previous defaults (pure targeting + scenarios + class bias, loss-focused "
                    "sampler, chains floor 0.5)")),
    ("ls_no_consistency", lambda: lightning_synth_method(
        "ls_no_consistency", gan=False,
        description="ablation: the defaults without the consistency objective")),
    ("ls_source", lambda: lightning_synth_method(
        "ls_source", gan=False, source=True,
        description="defaults + consistency with the real source (deliver_source=True; 2 forward passes)")),
    ("ls_source_chains", lambda: lightning_synth_method(
        "ls_source_chains", gan=False, source=True, consistency=True,
        description="ls_source with one targeted mixing-chain view of each source in the JSD (3 passes)")),
    ("uniform_share_source", lambda: lightning_synth_method(
        "uniform_share_source", gan=False, source=True, targeted=False,
        description="ablation: ls_source with the bank at random (no targeting)")),
    ("uniform_share_source_sampler", lambda: lightning_synth_method(
        "uniform_share_source_sampler", gan=False, source=True, targeted=False, untargeted_sampler=True,
        description="ablation: uniform_share_source with the loss-focused sampler (no profile targeting)")),
    ("uniform_share", lambda: lightning_synth_method(
        "uniform_share", gan=False, consistency=True, targeted=False,
        description="lightning_synth's pool, share, budget and JSD with the bank at random: no targeting")),
    ("uniform_share_sampler", lambda: lightning_synth_method(
        "uniform_share_sampler", gan=False, consistency=True, targeted=False, untargeted_sampler=True,
        description="ablation: uniform_share with lightning_synth's loss-focused sampler (no profile targeting)")),
]

for _name, _make in VARIANTS:
    register_method(_make(), overwrite=True)
