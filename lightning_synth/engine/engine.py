"""`SynthesisEngine`: the synthesis loop without Lightning — generate, store, weigh, and apply settings.

One engine owns the generators, the :class:`~lightning_synth.data.pool.SyntheticPool`, the
:class:`~lightning_synth.data.weighting.SyntheticWeighting` and the settings controller. A shell (the
Lightning callbacks) calls :meth:`SynthesisEngine.epoch_start` once per epoch on every rank and
:meth:`SynthesisEngine.observe` with the epoch's per-sample losses; all cross-process agreement goes through a
:class:`~lightning_synth.engine.comm.Comm`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from lightning_synth._validation import check_choice, check_int, check_number
from lightning_synth.control import SynthesisController, SynthesisSettings
from lightning_synth.data.pool import StorageDtype, SyntheticPool
from lightning_synth.data.sampler import AdaptiveSampler
from lightning_synth.data.weighting import SyntheticWeighting, allocate_budget
from lightning_synth.engine.comm import Comm
from lightning_synth.engine.generation import RealCache, concat, part_seed, rank_shares, replay, run_part
from lightning_synth.generators.base import SyntheticGenerator
from lightning_synth.profile import WeaknessProfile

__all__ = ["EpochContext", "RefreshReport", "SynthesisEngine", "resolve_budget"]

BUDGET_BOUNDS = (256, 50_000)
_STATE_VERSION = 1


def resolve_budget(budget: int | float, num_real: int) -> int:
    """Samples per refresh: an int as is, a fraction of the real training set bounded to [256, 50_000].

    Example:
        >>> resolve_budget(0.5, 1000), resolve_budget(0.01, 1000), resolve_budget(300, 10)
        (500, 256, 300)
    """
    if isinstance(budget, int):
        return budget
    return min(max(round(budget * num_real), BUDGET_BOUNDS[0]), BUDGET_BOUNDS[1])


def _default_generators() -> list[SyntheticGenerator]:
    from lightning_synth.generators.targeted import TargetedAugmentation

    return [TargetedAugmentation()]


@dataclass
class EpochContext:
    """Where the loop stands: the epoch, the device and the model generators may use."""

    epoch: int
    step: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    task_model: nn.Module | None = None


@dataclass
class RefreshReport:
    """What one epoch start did: settings changes, budgets, samples made, metrics to log, sample images."""

    changes: list[str] = field(default_factory=list)
    budgets: dict[str, int] = field(default_factory=dict)
    generated: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    samples: dict[str, Tensor] = field(default_factory=dict)


def _sync(controller: SynthesisController, comm: Comm, epoch: int, step: int) -> list[str]:
    return controller.sync(comm, epoch=epoch, step=step)


class SynthesisEngine:
    """Generators, pool, weighting and settings, driven once per epoch; no Lightning.

    Args:
        generators: synthetic-data generators (default: ``TargetedAugmentation()``; add ``ScenarioGenerator`` for
            compound perturbations, confusion compositions and your slice scenarios, or a GAN).
        synthetic_budget: samples per refresh: an int, or a float in (0, 1], a fraction of the real training
            set bounded to [256, 50_000] (resolved when the data are bound).
        max_pool_samples: pool capacity; ``None``: twice the resolved budget.
        max_pool_bytes: pool capacity in bytes of the pixel cache, ``None`` for no byte bound.
        eviction: which samples leave a full pool first (``"learned"``: the lowest recent training loss).
        real_cache_size: real training samples kept on hand for generators to transform (as uint8 levels when
            the data are of 8-bit origin: lossless, a quarter of float32's memory).
        min_generator_share: budget floor per generator when the budget follows sampler mass.
        initial_synthetic_weight: multiplier of the synthetic share before any feedback (0.75: chosen on
            the robustness benchmark's validation corruptions).
        min_synthetic_weight: lower bound of the synthetic weight.
        max_synthetic_weight: upper bound of the synthetic weight.
        plateau_patience: epochs without progress on synthetic data before the weight is lowered.
        refresh_every_n_epochs: refresh the pool every N epochs.
        sampler_temperature: temperature of the adaptive sampler (its one home; ``1e6`` is uniform).
        sampler_uniform_mix: share of sampler mass spread uniformly; the rest follows each sample's loss
            history (0.2: loss-focused draws beat uniform ones, 1, on the robustness benchmark's validation
            corruptions, seeds 0-2); the synthetic weight scales the synthetic share either way.
        seed: seed of the real cache, the generation calls and eviction.
        chunk_size: most samples one generation call makes (bounds memory whatever the budget).
        pool_storage_dtype: how the pool keeps its pixels in RAM: ``"uint8"`` (default: [0, 1] quantised to
            256 levels, a quarter of float32's memory; the resolution of 8-bit images), ``"float16"`` or
            ``"float32"`` (exact). Items are returned as float32 either way; ``max_pool_bytes`` counts the
            stored bytes.

    Raises:
        TypeError: if a generator is not a ``SyntheticGenerator`` or a number has the wrong type.
        ValueError: if a number is out of range or two generators share a name.

    Example:
        >>> from lightning_synth.engine.comm import LocalComm
        >>> engine = SynthesisEngine(synthetic_budget=64, real_cache_size=64)
        >>> real = torch.rand(100, 1, 8, 8), torch.arange(100) % 10
        >>> engine.bind(100, lambda index: (real[0][index], real[1][index]))
        >>> report = engine.epoch_start(None, EpochContext(epoch=0), LocalComm())
        >>> sum(report.generated.values()), len(engine.pool)
        (64, 64)
    """

    def __init__(
        self,
        generators: Sequence[SyntheticGenerator] | None = None,
        synthetic_budget: int | float = 1 / 3,
        max_pool_samples: int | None = None,
        max_pool_bytes: int | None = None,
        eviction: Literal["oldest", "lowest_quality", "learned", "random"] = "oldest",
        real_cache_size: int = 8192,
        min_generator_share: float = 0.1,
        initial_synthetic_weight: float = 0.75,
        min_synthetic_weight: float = 0.1,
        max_synthetic_weight: float = 2.0,
        plateau_patience: int = 2,
        refresh_every_n_epochs: int = 1,
        sampler_temperature: float = 2.0,
        sampler_uniform_mix: float = 0.2,
        seed: int = 0,
        chunk_size: int = 2048,
        pool_storage_dtype: StorageDtype = "uint8",
    ) -> None:
        self.generators = list(_default_generators() if generators is None else generators)
        for g in self.generators:
            if not isinstance(g, SyntheticGenerator):
                raise TypeError(f"`generators` must hold SyntheticGenerator instances, got {type(g).__name__}")
        names = [g.name for g in self.generators]
        if len(set(names)) != len(names):
            raise ValueError(f"`generators` must have unique names, got {names}")
        if isinstance(synthetic_budget, float):
            check_number("synthetic_budget", synthetic_budget, low=0.0, high=1.0, low_open=True)
        else:
            check_int("synthetic_budget", synthetic_budget, 0)
        if max_pool_samples is not None:
            check_int("max_pool_samples", max_pool_samples, 1)
        check_int("real_cache_size", real_cache_size, 1)
        check_int("seed", seed, 0)
        check_int("chunk_size", chunk_size, 1)
        check_choice("pool_storage_dtype", pool_storage_dtype, get_args(StorageDtype))
        check_number("min_generator_share", min_generator_share, low=0.0, high=1.0 / max(len(names), 1))
        self.synthetic_budget = synthetic_budget
        self.max_pool_samples = max_pool_samples
        self.pool = SyntheticPool(max_samples=max_pool_samples or 1, max_bytes=max_pool_bytes, eviction=eviction,
                                  storage_dtype=pool_storage_dtype, seed=seed)
        self.weighting = SyntheticWeighting(base_weight=initial_synthetic_weight, min_weight=min_synthetic_weight,
                                            max_weight=max_synthetic_weight, patience=plateau_patience)
        initial = synthetic_budget if isinstance(synthetic_budget, int) else SynthesisSettings().synthetic_budget
        settings = SynthesisSettings(synthetic_budget=initial, refresh_every_n_epochs=refresh_every_n_epochs,
                                     sampler_temperature=sampler_temperature, sampler_uniform_mix=sampler_uniform_mix)
        self.controller = SynthesisController(settings, known_generators=names)
        self.real_cache_size, self.min_generator_share, self.seed = real_cache_size, min_generator_share, seed
        self.chunk_size = chunk_size
        self.generated: dict[str, int] = {}
        self.first_profile: WeaknessProfile | None = None
        self.last_profile: WeaknessProfile | None = None
        self.sampler: AdaptiveSampler | None = None
        self.num_real = 0
        self._real_sample: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None
        self._real: RealCache | None = None
        self._losses: dict[str, float | None] = {"synthetic": None, "real": None}
        self._budget_resolved = isinstance(synthetic_budget, int)
        self._saved_num_real: int | None = None

    # ------------------------------------------------------------------------------------------ binding
    def bind(self, num_real: int, real_sample: Callable[[Tensor], tuple[Tensor, Tensor]],
             sampler: AdaptiveSampler | None = None) -> None:
        """Attach the real training set (its size and ``index -> (inputs, targets)``) and the sampler.

        Resolves a fractional budget and the default pool capacity.

        Raises:
            ValueError: if a checkpoint loaded earlier was made on a training set of another size.
        """
        check_int("num_real", num_real, 1)
        if self._saved_num_real is not None and self._saved_num_real != num_real:
            raise ValueError(
                f"the checkpoint was made with a training set of {self._saved_num_real} samples, this one has "
                f"{num_real}: per-sample scores and the pool's sources would land on other samples"
            )
        self.num_real, self._real_sample, self.sampler = num_real, real_sample, sampler
        budget = resolve_budget(self.synthetic_budget, num_real)
        if not self._budget_resolved:
            # one audited change, applied by the first sync on every rank
            self.controller.update(synthetic_budget=budget, source=f"synthetic_budget={self.synthetic_budget:.4g} "
                                   f"of {num_real} real samples")
            self._budget_resolved = True
        if self.max_pool_samples is None and len(self.pool) == 0:
            self.pool.max_samples = max(2 * budget, 1)

    @property
    def real(self) -> RealCache:
        """The real cache (read on first use): a seeded sample of the real set, mapped to [0, 1] (kept as uint8
        levels when the data are of 8-bit origin, losslessly; see :class:`RealCache`)."""
        if self._real is None:
            if self._real_sample is None:
                raise RuntimeError("SynthesisEngine needs real data: call `bind(num_real, real_sample)` first")
            n = min(self.real_cache_size, self.num_real)
            index = torch.randperm(self.num_real, generator=torch.Generator().manual_seed(self.seed))[:n]
            # in blocks, so no transient the size of the cache is made (NaN is reported as the user's data)
            self._real = RealCache.read(self._real_sample, index)
        return self._real

    # ------------------------------------------------------------------------------------------ the loop
    def epoch_start(self, measured: WeaknessProfile | None, context: EpochContext, comm: Comm) -> RefreshReport:
        """Apply settings changes, restore a resumed pool, refresh it when due, and reweigh (every rank)."""
        report = RefreshReport(changes=_sync(self.controller, comm, context.epoch, context.step))
        settings = self.controller.settings
        if self.sampler is not None:
            self.sampler.temperature = settings.sampler_temperature
            self.sampler.uniform_mix = settings.sampler_uniform_mix
        if measured is not None:
            self.first_profile = self.first_profile or measured
            self.last_profile = measured
        self.restore(context)
        due = context.epoch % settings.refresh_every_n_epochs == 0
        if due and not settings.paused and settings.synthetic_budget > 0:
            # Before the first analysis the profile is empty: generators then spread over the whole bank.
            profile = settings.effective_profile(measured) or WeaknessProfile()
            self.refresh(profile, context, comm, report)
        report.metrics.update(self.reweight(context.epoch))
        self.controller.publish(profile=measured, pool=self.pool.stats(),
                                sampler=self.sampler.stats() if self.sampler is not None else None,
                                weighting={"weight": self.weighting.weight, "reason": self.weighting.reason},
                                epoch=context.epoch)
        return report

    def budgets(self) -> dict[str, int]:
        """Next refresh's samples per generator (never more in total than the pool can keep)."""
        settings = self.controller.settings
        names = [g.name for g in self.generators]
        total = min(settings.synthetic_budget, self.pool.capacity)
        if settings.generator_mix:
            return settings.model_copy(update={"synthetic_budget": total}).generator_budgets(names)
        mass = self.sampler.group_mass() if self.sampler is not None else {}
        return allocate_budget(total, {n: mass.get(f"synthetic/{n}", 0.0) for n in names},
                               min_share=self.min_generator_share)

    def refresh(self, profile: WeaknessProfile, context: EpochContext, comm: Comm,
                report: RefreshReport | None = None) -> RefreshReport:
        """Generate this refresh's budget in chunks of at most ``chunk_size``; each rank makes its share of a
        chunk, the shares are gathered so every rank stores the same samples, and the call is recorded."""
        report = report or RefreshReport()
        report.budgets = self.budgets()
        profile_json = profile.to_json()
        for gi, generator in enumerate(self.generators):
            budget = report.budgets.get(generator.name, 0)
            for ci, start in enumerate(range(0, budget, self.chunk_size)):
                shares = rank_shares(min(self.chunk_size, budget - start), comm.world_size)
                parts = [[part_seed(self.seed, context.epoch, gi, ci, r), s] for r, s in enumerate(shares)]
                seed, share = parts[comm.rank]
                local = run_part(generator, profile, share, seed, self.real, context.device, context.epoch,
                                 context.task_model)
                batch = concat(comm.gather_objects(local), generator.name)
                if batch is None:
                    continue
                recipe = ({"generator": generator.name, "epoch": context.epoch, "profile": profile_json,
                           "parts": parts} if generator.replayable else None)
                self._store(batch, context.epoch, recipe)
                report.generated[generator.name] = report.generated.get(generator.name, 0) + len(batch)
                if generator.name not in report.samples:  # a copy: the chunk's buffer is freed now
                    report.samples[generator.name] = batch.inputs[:32].clone()
        for name, count in report.generated.items():
            self.generated[name] = self.generated.get(name, 0) + count
            report.metrics[f"synth/generated/{name}"] = float(count)
        for name, count in report.budgets.items():
            report.metrics[f"synth/budget/{name}"] = float(count)
        self._regroup()
        return report

    def observe(self, indices: Tensor, losses: Tensor) -> None:
        """The epoch's per-sample training losses (dataset indices, identical on every rank): kept for
        :meth:`reweight`, and recorded on pool samples (``eviction="learned"``)."""
        indices, losses = indices.long().cpu(), losses.double().cpu()
        synthetic = indices >= self.num_real
        self._losses = {
            "synthetic": float(losses[synthetic].mean()) if bool(synthetic.any()) else None,
            "real": float(losses[~synthetic].mean()) if bool((~synthetic).any()) else None,
        }
        positions = indices[synthetic] - self.num_real
        keep = positions < len(self.pool)
        if bool(keep.any()):
            self.pool.record_losses(positions[keep], losses[synthetic][keep])

    def reweight(self, epoch: int) -> dict[str, float]:
        """Update the synthetic weight from the last observed losses and the pool's quality; scale the
        sampler's synthetic groups by it. Returns metrics."""
        automatic = self.weighting.update(self._losses["synthetic"], self.pool.mean_quality, epoch)
        weight = self.controller.settings.resolve_weight(automatic)
        metrics = {"synth/weight": float(weight), "synth/pool_size": float(len(self.pool))}
        if self.sampler is not None:
            for name in self.sampler.group_names:
                if name.startswith("synthetic/"):
                    self.sampler.set_group_scale(name, weight)
            mass = self.sampler.group_mass()
            metrics["synth/mass_synthetic"] = float(sum(v for k, v in mass.items() if k.startswith("synthetic/")))
        if self.pool.mean_quality is not None:
            metrics["synth/quality"] = float(self.pool.mean_quality)
        for key in ("synthetic", "real"):
            if self._losses[key] is not None:
                metrics[f"synth/loss_{key}"] = float(self._losses[key])  # type: ignore[arg-type]
        for name, count in self.pool.stats().get("count_by_generator", {}).items():
            metrics[f"synth/pool/{name}"] = float(count)
        return metrics

    def restore(self, context: EpochContext) -> int:
        """Re-make the pixels of a pool loaded from a checkpoint by replaying its recipes; returns how many
        recipes were replayed (each rank replays all of them: no communication)."""
        pending = self.pool.pending_recipes()
        if not pending:
            return 0
        by_name = {g.name: g for g in self.generators}
        real = self.real
        for chunk, recipe in pending.items():
            generator = by_name.get(recipe["generator"])
            if generator is None:
                raise ValueError(f"the checkpoint's pool holds samples of generator {recipe['generator']!r}, which "
                                 f"this run does not have (generators: {sorted(by_name)})")
            batch = replay(recipe, generator, real, context.device, context.task_model)
            if batch is None:
                raise ValueError(f"replaying generator {recipe['generator']!r}'s recipe {chunk} gave no samples")
            self.pool.restore_chunk(chunk, batch)
        return len(pending)

    def summary(self) -> str:
        """Top weaknesses at the first and last analysis, and what was generated for each."""
        lines = ["lightning_synth summary"]
        for title, profile in (("first analysis", self.first_profile), ("last analysis", self.last_profile)):
            if profile is None:
                lines.append(f"  {title}: none")
                continue
            top = ", ".join(f"{w.key} ({w.gap:+.3f})" for w in profile.top(5))
            lines.append(f"  {title} (epoch {profile.epoch}, clean error {profile.clean_error:.3f}): {top}")
        lines.append(f"  generated: {self.generated or 'nothing'}")
        by_weakness = self.pool.stats().get("count_by_weakness", {})
        top_w = sorted(by_weakness.items(), key=lambda kv: -kv[1])[:8]
        lines.append("  pool by weakness: " + (", ".join(f"{k}: {v}" for k, v in top_w) or "empty"))
        return "\n".join(lines)

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "num_real": self.num_real,
            "pool": self.pool.state_dict(),
            "pool_max_samples": self.pool.max_samples,
            "weighting": self.weighting.state_dict(),
            "controller": self.controller.state_dict(),
            "generators": {g.name: g.state_dict() for g in self.generators},
            "generated": dict(self.generated),
            "losses": dict(self._losses),
            "budget_resolved": self._budget_resolved,
            "first_profile": self.first_profile.to_json() if self.first_profile else None,
            "last_profile": self.last_profile.to_json() if self.last_profile else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != _STATE_VERSION:
            raise ValueError(f"engine state version {state_dict.get('version')!r} is not {_STATE_VERSION}")
        if self.max_pool_samples is None:
            self.pool.max_samples = int(state_dict["pool_max_samples"])
        self.pool.load_state_dict(state_dict["pool"])
        self.weighting.load_state_dict(state_dict["weighting"])
        self.controller.load_state_dict(state_dict["controller"])
        for g in self.generators:
            if g.name in state_dict["generators"]:
                g.load_state_dict(state_dict["generators"][g.name])
        self.generated = dict(state_dict["generated"])
        self._losses = dict(state_dict["losses"])
        self._budget_resolved = bool(state_dict["budget_resolved"])
        first, last = state_dict["first_profile"], state_dict["last_profile"]
        self.first_profile = WeaknessProfile.from_json(first) if first else None
        self.last_profile = WeaknessProfile.from_json(last) if last else None
        self._saved_num_real = int(state_dict["num_real"]) or None

    # ------------------------------------------------------------------------------------------ helpers
    def _store(self, batch: Any, epoch: int, recipe: dict[str, Any] | None) -> None:
        update = self.pool.add(batch, epoch, recipe=recipe)
        if self.sampler is not None:
            self.sampler.resize(self.num_real + len(self.pool))
            self.sampler.reset(update.changed + self.num_real)  # replaced slots hold new samples

    def _regroup(self) -> None:
        if self.sampler is not None:
            groups = self.pool.indices_by_generator().items()
            self.sampler.set_groups({f"synthetic/{g}": idx + self.num_real for g, idx in groups})
