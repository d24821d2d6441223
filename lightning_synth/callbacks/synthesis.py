"""`SynthesisCallback`: at each train epoch start, turns the latest profile into synthetic data and weights.

Added for you by :class:`~lightning_synth.data.SyntheticDataModule` (you never need to construct it). Per
refresh: apply control-API changes on every rank, split each generator's budget across ranks, gather the
samples so every rank holds the same pool, feed the pool to the sampler, update the synthetic weight from
quality and learning progress, and log what was decided.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_synth.callbacks.adaptive_sampling import AdaptiveSampling
from lightning_synth.callbacks.failure_mode import FailureModeCallback
from lightning_synth.data.weighting import allocate_budget
from lightning_synth.generators.base import GenerationContext, SyntheticBatch
from lightning_synth.logging import image_grid, log_images
from lightning_synth.profile import WeaknessProfile
from lightning_synth.progress import track

if TYPE_CHECKING:
    from lightning_synth.data.datamodule import SyntheticDataModule

__all__ = ["SynthesisCallback"]


class SynthesisCallback(Callback):
    """Drives the refreshes of a :class:`~lightning_synth.data.SyntheticDataModule` (added by it)."""

    def __init__(self, datamodule: SyntheticDataModule) -> None:
        self.dm = datamodule
        self.first_profile: WeaknessProfile | None = None
        self._real_cache: tuple[Tensor, Tensor] | None = None

    @property
    @override
    def state_key(self) -> str:
        return "SynthesisCallback"

    @classmethod
    def attach(cls, trainer: L.Trainer, datamodule: SyntheticDataModule) -> None:
        """Add this callback, and default analyzer/sampling callbacks when the trainer lacks them."""
        callbacks = _callbacks(trainer)
        if not any(isinstance(c, FailureModeCallback) for c in callbacks):
            callbacks.append(FailureModeCallback(batch_adapter=datamodule.adapter))
        if not any(isinstance(c, AdaptiveSampling) for c in callbacks):
            callbacks.append(AdaptiveSampling(batch_adapter=datamodule.adapter))
        if not any(isinstance(c, cls) for c in callbacks):
            callbacks.append(cls(datamodule))

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank == 0:
            self.dm.start_server()

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm, sampler = self.dm, self.dm.sampler
        if sampler is None:
            return
        changes = dm.controller.sync(trainer.strategy, epoch=trainer.current_epoch, step=trainer.global_step)
        for line in changes:
            rank_zero_info(f"lightning_synth settings: {line}")
        settings = dm.controller.settings
        sampler.temperature, sampler.uniform_mix = settings.sampler_temperature, settings.sampler_uniform_mix
        measured = self._measured_profile(trainer)
        if measured is not None and self.first_profile is None:
            self.first_profile = measured
        # Before the first analysis the profile is empty: generators then spread over the whole bank.
        profile = settings.effective_profile(measured) or WeaknessProfile()
        metrics: dict[str, float] = {}
        due = trainer.current_epoch % settings.refresh_every_n_epochs == 0
        if due and not settings.paused and settings.synthetic_budget > 0:
            metrics.update(self._refresh(trainer, pl_module, profile))
        metrics.update(self._reweight(trainer))
        dm.controller.publish(profile=measured, pool=dm.pool.stats(), sampler=sampler.stats(),
                              weighting={"weight": dm.weighting.weight, "reason": dm.weighting.reason},
                              epoch=trainer.current_epoch)
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=False, rank_zero_only=False)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank_zero_info(self.summary(trainer))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"first_profile": self.first_profile and self.first_profile.to_json()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        first = state_dict.get("first_profile")
        self.first_profile = WeaknessProfile.from_json(first) if first else None

    # ------------------------------------------------------------------------------------- helpers
    def _measured_profile(self, trainer: L.Trainer) -> WeaknessProfile | None:
        for callback in _callbacks(trainer):
            if isinstance(callback, FailureModeCallback) and callback.profile is not None:
                return callback.profile
        return None

    def _refresh(self, trainer: L.Trainer, pl_module: L.LightningModule, profile: WeaknessProfile) -> dict[str, float]:
        dm, sampler, mixed = self.dm, self.dm.sampler, self.dm.mixed
        assert sampler is not None and mixed is not None
        names = [g.name for g in dm.generators]
        mass = sampler.group_mass()
        by_generator = {n: mass.get(f"synthetic/{n}", 0.0) for n in names}
        settings = dm.controller.settings
        if settings.generator_mix:
            budgets = settings.generator_budgets(names)
        else:
            budgets = allocate_budget(settings.synthetic_budget, by_generator, min_share=dm.min_generator_share)
        if self._real_cache is None:
            self._real_cache = dm.real_cache()
        metrics: dict[str, float] = {}
        grids: dict[str, Tensor] = {}
        # One step per generator; shown only where the trainer shows its own bar (global rank 0).
        for gi, generator in enumerate(track(dm.generators, trainer, "Synthesis", label=lambda g: g.name)):
            batch = self._generate_shared(trainer, pl_module, gi, profile, budgets[generator.name])
            if batch is None or len(batch) == 0:
                continue
            update = dm.pool.add(batch, trainer.current_epoch)
            sampler.resize(len(mixed))
            sampler.reset(update.changed + mixed.num_real)  # replaced slots hold new samples: forget their losses
            dm.generated[generator.name] = dm.generated.get(generator.name, 0) + len(batch)
            metrics[f"synth/generated/{generator.name}"] = float(len(batch))
            grids[generator.name] = image_grid(batch.inputs[:32])
        groups = dm.pool.indices_by_generator().items()
        sampler.set_groups({f"synthetic/{g}": idx + mixed.num_real for g, idx in groups})
        for name, count in budgets.items():
            metrics[f"synth/budget/{name}"] = float(count)
        if dm.log_images and grids:
            log_images(trainer, "synth/samples", grids)
        return metrics

    def _generate_shared(
        self, trainer: L.Trainer, pl_module: L.LightningModule, index: int, profile: WeaknessProfile, budget: int
    ) -> SyntheticBatch | None:
        """Each rank makes its share of ``budget``; the shares are gathered so every rank has all of them."""
        world, rank = max(trainer.world_size, 1), trainer.global_rank
        share = budget // world + int(rank < budget % world)
        generator = self.dm.generators[index]
        local: SyntheticBatch | None = None
        if share > 0:
            seed = hash((self.dm.seed, trainer.current_epoch, index, rank)) % (2**62)
            assert self._real_cache is not None
            inputs, targets = self._real_cache
            context = GenerationContext(
                real_inputs=inputs, real_targets=targets, num_classes=int(targets.max()) + 1,
                generator=torch.Generator().manual_seed(seed), device=pl_module.device,
                epoch=trainer.current_epoch, task_model=pl_module,
            )
            was_training = pl_module.training
            pl_module.eval()
            try:
                local = generator.generate(profile, share, context)
            except Exception as error:  # a generator's failure must not stop training
                warnings.warn(f"Generator {generator.name!r} failed and is skipped this epoch: {error!r}",
                              stacklevel=2)
                local = None
            finally:
                pl_module.train(was_training)
        if world == 1 or not (dist.is_available() and dist.is_initialized()):
            return local
        # Stateful generators (a GAN fitted in the loop) must stay identical on every rank: rank 0's state wins.
        state = generator.state_dict()
        if state:
            generator.load_state_dict(trainer.strategy.broadcast(state, src=0))
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, local)
        batches = [p for p in parts if p is not None and len(p) > 0]
        if not batches:
            return None
        return SyntheticBatch(
            inputs=torch.cat([b.inputs for b in batches]), targets=torch.cat([b.targets for b in batches]),
            weakness=[w for b in batches for w in b.weakness], quality=torch.cat([b.quality for b in batches]),
            generator=batches[0].generator,
        )

    def _reweight(self, trainer: L.Trainer) -> dict[str, float]:
        dm, sampler = self.dm, self.dm.sampler
        assert sampler is not None and dm.mixed is not None
        num_real = dm.mixed.num_real
        synthetic_loss = real_loss = None
        for callback in _callbacks(trainer):
            if isinstance(callback, AdaptiveSampling) and callback.last_update:
                indices, losses = callback.last_update["indices"], callback.last_update["losses"].double()
                synthetic = indices >= num_real
                if synthetic.any():
                    synthetic_loss = float(losses[synthetic].mean())
                if (~synthetic).any():
                    real_loss = float(losses[~synthetic].mean())
        automatic = dm.weighting.update(synthetic_loss, dm.pool.mean_quality, trainer.current_epoch)
        weight = dm.controller.settings.resolve_weight(automatic)
        for name in sampler.group_names:
            if name.startswith("synthetic/"):
                sampler.set_group_scale(name, weight)
        mass = sampler.group_mass()
        metrics = {
            "synth/weight": float(weight),
            "synth/pool_size": float(len(dm.pool)),
            "synth/mass_synthetic": float(sum(v for k, v in mass.items() if k.startswith("synthetic/"))),
        }
        if dm.pool.mean_quality is not None:
            metrics["synth/quality"] = float(dm.pool.mean_quality)
        if synthetic_loss is not None:
            metrics["synth/loss_synthetic"] = synthetic_loss
        if real_loss is not None:
            metrics["synth/loss_real"] = real_loss
        for name, count in dm.pool.stats().get("count_by_generator", {}).items():
            metrics[f"synth/pool/{name}"] = float(count)
        return metrics

    def summary(self, trainer: L.Trainer) -> str:
        """Top weaknesses at the start and at the end of fit, and what was generated for each."""
        last = self._measured_profile(trainer)
        lines = ["lightning_synth summary"]
        for title, profile in (("first analysis", self.first_profile), ("last analysis", last)):
            if profile is None:
                lines.append(f"  {title}: none")
                continue
            top = ", ".join(f"{w.key} ({w.gap:+.3f})" for w in profile.top(5))
            lines.append(f"  {title} (epoch {profile.epoch}, clean error {profile.clean_error:.3f}): {top}")
        lines.append(f"  generated: {self.dm.generated or 'nothing'}")
        by_weakness = self.dm.pool.stats().get("count_by_weakness", {})
        top_w = sorted(by_weakness.items(), key=lambda kv: -kv[1])[:8]
        lines.append("  pool by weakness: " + (", ".join(f"{k}: {v}" for k, v in top_w) or "empty"))
        return "\n".join(lines)


def _callbacks(trainer: L.Trainer) -> list[Callback]:
    return trainer.callbacks  # type: ignore[attr-defined,no-any-return]
