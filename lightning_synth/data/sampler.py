"""A loss-driven, distributed-safe sampler over real and synthetic data.

Math lives in the pure functions at the top (:func:`tempered_probabilities`, :func:`systematic_draw`);
:class:`AdaptiveSampler` is the stateful shell that keeps each sample's loss estimate, the index groups
(real, synthetic, ...) and their scales, and draws every epoch's indices.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterator, Mapping, Sized
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DistributedSampler

from lightning_synth.data.mapped import mapped_extended, mapped_zeros

__all__ = ["REAL_GROUP", "AdaptiveSampler", "systematic_draw", "tempered_probabilities"]

REAL_GROUP = "real"
_STATE_VERSION = 1


def tempered_probabilities(scores: Tensor, temperature: float, uniform_mix: float) -> Tensor:
    """Sampling probabilities ``(1 - uniform_mix) * s**(1/T) / sum(s**(1/T)) + uniform_mix / N``.

    Computed in log space, so a small temperature cannot overflow; all-zero scores give uniform.

    Example:
        >>> tempered_probabilities(torch.tensor([1.0, 3.0]), temperature=1.0, uniform_mix=0.0).tolist()
        [0.25, 0.75]
    """
    scores = scores.double().clamp_min(0.0)
    n = scores.numel()
    if n == 0 or not bool((scores > 0).any()):
        return torch.full((n,), 1.0 / max(n, 1), dtype=torch.float64)
    logw = scores.log() / temperature
    weights = (logw - logw.max()).exp()
    return (1.0 - uniform_mix) * weights / weights.sum() + uniform_mix / n


def systematic_draw(probabilities: Tensor, num_draws: int, generator: torch.Generator) -> Tensor:
    """Draw ``num_draws`` indices with replacement by systematic resampling, then shuffle them.

    Each index ``i`` appears ``floor(M p_i)`` or ``ceil(M p_i)`` times (unbiased, lower variance than
    i.i.d. multinomial draws); with uniform probabilities and ``M = N`` it is a random permutation.

    Example:
        >>> draw = systematic_draw(torch.full((4,), 0.25), 4, torch.Generator().manual_seed(0))
        >>> sorted(draw.tolist())
        [0, 1, 2, 3]
    """
    cdf = probabilities.double().cumsum(0)
    cdf = cdf / cdf[-1]
    offset = torch.rand(1, generator=generator, dtype=torch.float64)
    points = (offset + torch.arange(num_draws, dtype=torch.float64)) / num_draws
    picks = torch.searchsorted(cdf, points, right=True).clamp_(max=probabilities.numel() - 1)
    return picks[torch.randperm(num_draws, generator=generator)]


def _world(value: int | None, kind: Literal["size", "rank"]) -> int:
    if value is not None:
        return value
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() if kind == "size" else dist.get_rank()
    return 1 if kind == "size" else 0


def _check_int(name: str, value: Any, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        rule = f"an integer >= {low}" + (" or None" if allow_none else "")
        raise ValueError(f"`{name}` must be {rule}, got {value!r}")


def _as_index_tensor(name: str, value: Any, n: int) -> Tensor:
    tensor = torch.as_tensor(value)
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"`{name}` must hold integer indices, got dtype {tensor.dtype}")
    tensor = tensor.reshape(-1).long().cpu()
    if tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) >= n):
        raise ValueError(
            f"`{name}` must hold indices in [0, {n}), got values in [{int(tensor.min())}, {int(tensor.max())}]"
        )
    return tensor


class AdaptiveSampler(DistributedSampler):
    """Draws each epoch's indices in proportion to each sample's loss history, identically on every rank.

    A :class:`~torch.utils.data.DistributedSampler` subclass, so Lightning does not replace it. Every rank
    draws the same ``total_size`` indices (seeded by ``seed + epoch``) and takes the disjoint shard
    ``draw[rank::num_replicas]``. A sample's score is an exponential moving average of its observed losses;
    unseen samples get a prior (the mean or max seen score). Probabilities are the scores tempered by
    ``temperature`` and mixed with a uniform floor, then each index group (``"real"`` plus the groups of
    :meth:`set_groups`) is scaled by :meth:`set_group_scale` and everything renormalised.

    Args:
        dataset: the (map-style, sized) dataset to sample from.
        num_replicas: number of processes; default the process group's world size, or 1 without one.
        rank: this process's rank; default the process group's rank, or 0 without one.
        seed: base seed; epoch ``e`` draws with ``seed + e`` on every rank.
        num_samples: indices drawn per epoch over all ranks (default ``len(dataset)``, following
            :meth:`resize`). As in ``DistributedSampler``, the *attribute* ``num_samples`` is the per-rank
            count and ``total_size`` the rounded total.
        drop_last: round the per-epoch total down (instead of up) to a multiple of ``num_replicas``.
        temperature: ``p ∝ score**(1/temperature)``; larger is flatter, ``inf`` is uniform. The default 2
            (``p ∝ sqrt(loss)``) is concave like the per-sample gradient-norm bound of importance sampling
            (which saturates for large losses), so ambiguous or mislabeled samples do not take over the draw;
            ``temperature=1`` focused harder and was no faster in ``benchmarks/sampling.py``.
        uniform_mix: share of the probability mass spread uniformly, so no sample starves.
        ema_decay: weight of the old score when a new loss observation arrives (0 keeps only the latest).
        prior: score of never-seen samples: the ``"mean"`` or ``"max"`` of the seen scores.
        draw: ``"systematic"`` (low-variance resampling; a plain shuffle when weights are uniform) or
            ``"multinomial"`` (i.i.d. draws with replacement).

    Attributes:
        irreducible_losses: ``(N,)`` float64 per-sample irreducible-loss estimates kept for reducible-loss
            sampling (:class:`~lightning_synth.irreducible.IrreducibleLoss`); NaN until set, and again after
            :meth:`reset` (a replaced synthetic sample); resized and checkpointed with the scores.

    Raises:
        TypeError: if ``dataset`` has no length.
        ValueError: if any other argument is out of range.

    Example:
        >>> sampler = AdaptiveSampler(range(6), num_replicas=2, rank=0, uniform_mix=0.0)
        >>> sampler.update(torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0]))
        >>> sampler.probabilities().tolist()
        [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
        >>> list(sampler)
        [5, 5, 5]
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        num_samples: int | None = None,
        drop_last: bool = False,
        temperature: float = 2.0,
        uniform_mix: float = 0.2,
        ema_decay: float = 0.5,
        prior: Literal["mean", "max"] = "mean",
        draw: Literal["systematic", "multinomial"] = "systematic",
    ) -> None:
        if not isinstance(dataset, Sized):
            raise TypeError(f"`dataset` must be a sized map-style dataset, got {type(dataset).__name__}")
        if len(dataset) < 1:
            raise ValueError(f"`dataset` must not be empty, got len(dataset)={len(dataset)}")
        _check_int("num_replicas", num_replicas, 1, allow_none=True)
        _check_int("rank", rank, 0, allow_none=True)
        _check_int("seed", seed, -(2**62))
        _check_int("num_samples", num_samples, 1, allow_none=True)
        self._check_config(temperature, uniform_mix, ema_decay, prior, draw)
        self._auto_replicas, self._auto_rank = num_replicas is None, rank is None
        world, this_rank = _world(num_replicas, "size"), _world(rank, "rank")
        if this_rank >= world:
            raise ValueError(f"`rank` must be in [0, {world - 1}] for num_replicas={world}, got {this_rank}")
        super().__init__(dataset, world, this_rank, shuffle=True, seed=int(seed), drop_last=bool(drop_last))  # type: ignore[arg-type]
        self.temperature, self.uniform_mix, self.ema_decay = (
            float(temperature),
            float(uniform_mix),
            float(ema_decay),
        )
        self.prior, self.draw = prior, draw
        self._fixed_num_samples = num_samples
        self._n = len(dataset)
        self._scores = torch.zeros(self._n, dtype=torch.float64)
        self._seen = torch.zeros(self._n, dtype=torch.bool)
        self.irreducible_losses = torch.full((self._n,), math.nan, dtype=torch.float64)
        self._group_names: list[str] = []
        self._group_of = torch.zeros(self._n, dtype=torch.long)  # 0 is "real", k is _group_names[k - 1]
        self._scales: dict[str, float] = {}
        self.epoch_indices: Tensor = torch.empty(0, dtype=torch.long)
        self._refresh_sizes()

    @staticmethod
    def _check_config(temperature: float, uniform_mix: float, ema_decay: float, prior: str, draw: str) -> None:
        if not isinstance(temperature, numbers.Real) or not temperature > 0:
            raise ValueError(f"`temperature` must be a number > 0 (inf for uniform), got {temperature!r}")
        if not isinstance(uniform_mix, numbers.Real) or not 0.0 <= uniform_mix <= 1.0:
            raise ValueError(f"`uniform_mix` must be a number in [0, 1], got {uniform_mix!r}")
        if not isinstance(ema_decay, numbers.Real) or not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must be a number in [0, 1), got {ema_decay!r}")
        if prior not in ("mean", "max"):
            raise ValueError(f"`prior` must be 'mean' or 'max', got {prior!r}")
        if draw not in ("systematic", "multinomial"):
            raise ValueError(f"`draw` must be 'systematic' or 'multinomial', got {draw!r}")

    # ----------------------------------------------------------------------------------------- sizes
    def _refresh_sizes(self) -> None:
        if self._auto_replicas:
            self.num_replicas = _world(None, "size")
        if self._auto_rank:
            self.rank = _world(None, "rank")
        total = self._fixed_num_samples if self._fixed_num_samples is not None else self._n
        per_rank = total // self.num_replicas if self.drop_last else math.ceil(total / self.num_replicas)
        self.num_samples, self.total_size = per_rank, per_rank * self.num_replicas

    def __len__(self) -> int:
        self._refresh_sizes()
        return self.num_samples

    def resize(self, n: int) -> None:
        """Follow a dataset whose length changed: new indices are unseen (they get the prior), indices
        ``>= n`` are forgotten and leave their groups."""
        _check_int("n", n, 1)
        if n > self._n:  # per-sample arrays live for epochs: on maps of their own (see `mapped_zeros`)
            self._scores, self._seen = mapped_extended(self._scores, n, 0.0), mapped_extended(self._seen, n, False)
            self.irreducible_losses = mapped_extended(self.irreducible_losses, n, math.nan)
            self._group_of = mapped_extended(self._group_of, n, 0)
        else:
            self._scores, self._seen, self._group_of = self._scores[:n], self._seen[:n], self._group_of[:n]
            self.irreducible_losses = self.irreducible_losses[:n]
        self._n = int(n)
        self._refresh_sizes()

    # ----------------------------------------------------------------------------------------- scores
    def update(self, indices: Tensor, losses: Tensor) -> None:
        """Fold one round of observed losses into the scores.

        Losses of an index seen several times in one call are averaged first, then the EMA takes one step:
        ``score = ema_decay * score + (1 - ema_decay) * mean_loss`` (a first observation sets the score).
        Non-finite losses are skipped with a warning; negative losses are clamped to 0.

        Raises:
            ValueError: if shapes differ or an index is out of range.
        """
        idx = _as_index_tensor("indices", indices, self._n)
        values = torch.as_tensor(losses).detach().reshape(-1).to("cpu", torch.float64)
        if values.numel() != idx.numel():
            raise ValueError(
                f"`indices` and `losses` must have the same length, got {idx.numel()} and {values.numel()}"
            )
        finite = torch.isfinite(values)
        skipped = int((~finite).sum())
        if skipped:
            warnings.warn(
                f"AdaptiveSampler.update: skipped {skipped} of {values.numel()} non-finite losses (NaN/inf) "
                f"for indices {idx[~finite][:8].tolist()}{'...' if skipped > 8 else ''}; their weights are "
                "unchanged. "
                "Non-finite per-sample losses usually mean a diverging model or a bad sample.",
                RuntimeWarning,
                stacklevel=2,
            )
            idx, values = idx[finite], values[finite]
        if idx.numel() == 0:
            return
        sums = torch.zeros(self._n, dtype=torch.float64).index_add_(0, idx, values.clamp_min(0.0))
        counts = torch.bincount(idx, minlength=self._n)
        touched = counts > 0
        mean = sums[touched] / counts[touched]
        old, seen = self._scores[touched], self._seen[touched]
        self._scores[touched] = torch.where(seen, self.ema_decay * old + (1.0 - self.ema_decay) * mean, mean)
        self._seen[touched] = True

    def reset(self, indices: Tensor) -> None:
        """Forget the history of ``indices`` (e.g. replaced synthetic samples): they get the prior again, and
        their irreducible losses are unknown again."""
        idx = _as_index_tensor("indices", indices, self._n)
        self._scores[idx] = 0.0
        self._seen[idx] = False
        self.irreducible_losses[idx] = math.nan

    def scores(self) -> Tensor:
        """Each sample's score ``(N,)``: its loss EMA, or the prior when never seen."""
        if not bool(self._seen.any()):
            return torch.ones(self._n, dtype=torch.float64)
        seen_scores = self._scores[self._seen]
        prior = seen_scores.mean() if self.prior == "mean" else seen_scores.max()
        return torch.where(self._seen, self._scores, prior)

    # ----------------------------------------------------------------------------------------- groups
    def set_groups(self, groups: Mapping[str, Tensor]) -> None:
        """Name disjoint index groups (e.g. ``{"synthetic": idx}``); indices in no group form ``"real"``.

        Replaces earlier groups; scales set by :meth:`set_group_scale` are kept by name.

        Raises:
            TypeError: if a name is not a string or indices are not integers.
            ValueError: if a name is empty or ``"real"``, an index is out of range, or groups overlap.
        """
        if not isinstance(groups, Mapping):
            raise TypeError(f"`groups` must be a dict of name -> index tensor, got {type(groups).__name__}")
        group_of = mapped_zeros((self._n,), torch.long)
        names: list[str] = []
        for name, indices in groups.items():
            if not isinstance(name, str) or not name or name == REAL_GROUP:
                raise ValueError(f"`groups` names must be non-empty strings other than 'real', got {name!r}")
            idx = _as_index_tensor(f"groups[{name!r}]", indices, self._n)
            clash = group_of[idx] != 0
            if bool(clash.any()) or idx.unique().numel() != idx.numel():
                raise ValueError(
                    f"`groups` must be disjoint; group {name!r} repeats indices, e.g. {idx[clash][:5].tolist()}"
                )
            names.append(name)
            group_of[idx] = len(names)
        self._group_names, self._group_of = names, group_of

    def set_group_scale(self, name: str, scale: float) -> None:
        """Multiply the total mass of group ``name`` by ``scale`` (0 removes it from the draw).

        A scale for a name not yet passed to :meth:`set_groups` is kept and applies once the group exists.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"`name` must be a non-empty group name, got {name!r}")
        if not isinstance(scale, numbers.Real) or not (math.isfinite(scale) and scale >= 0):
            raise ValueError(f"`scale` must be a finite number >= 0, got {scale!r}")
        self._scales[name] = float(scale)

    @property
    def group_names(self) -> list[str]:
        """``"real"`` followed by the names passed to :meth:`set_groups`."""
        return [REAL_GROUP, *self._group_names]

    def probabilities(self) -> Tensor:
        """The draw distribution ``(N,)`` (float64, sums to 1), group scales applied.

        Raises:
            RuntimeError: if the group scales leave no probability mass.
        """
        base = tempered_probabilities(self.scores(), self.temperature, self.uniform_mix)
        scales = torch.tensor([self._scales.get(name, 1.0) for name in self.group_names], dtype=torch.float64)
        scaled = base * scales[self._group_of]
        total = scaled.sum()
        if not total > 0:
            raise RuntimeError(
                f"AdaptiveSampler has no probability mass left: group scales {self._scales} zero out every "
                f"non-empty group of {self.group_names}. Give at least one non-empty group a scale > 0."
            )
        return scaled / total

    def group_mass(self) -> dict[str, float]:
        """Probability mass per group after scaling (sums to 1), ``"real"`` first."""
        mass = torch.zeros(len(self.group_names), dtype=torch.float64)
        mass.index_add_(0, self._group_of, self.probabilities())
        return {name: float(m) for name, m in zip(self.group_names, mass, strict=True)}

    def stats(self) -> dict[str, float]:
        """Summary for logging: effective sample size, weight extremes (as multiples of uniform), mass.

        Keys: ``ess`` (``1 / sum p**2``), ``ess_ratio`` (``ess / N``), ``max_weight``, ``min_weight``,
        ``seen_ratio``, and ``mass/<group>`` for every group.
        """
        probs = self.probabilities()
        ess = float(1.0 / probs.square().sum())
        out = {
            "ess": ess,
            "ess_ratio": ess / self._n,
            "max_weight": float(probs.max()) * self._n,
            "min_weight": float(probs.min()) * self._n,
            "seen_ratio": float(self._seen.double().mean()),
        }
        out.update({f"mass/{name}": mass for name, mass in self.group_mass().items()})
        return out

    # ----------------------------------------------------------------------------------------- drawing
    def __iter__(self) -> Iterator[int]:
        if len(self.dataset) != self._n:  # type: ignore[arg-type]
            self.resize(len(self.dataset))  # type: ignore[arg-type]
        self._refresh_sizes()
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        probs = self.probabilities()
        if self.draw == "systematic":
            draw = systematic_draw(probs, self.total_size, generator)
        else:
            draw = torch.multinomial(probs, self.total_size, replacement=True, generator=generator)
        self.epoch_indices = draw[self.rank : self.total_size : self.num_replicas].clone()
        return iter(self.epoch_indices.tolist())

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Scores, irreducible losses, groups, scales and epoch; enough to reproduce the next draw on any rank."""
        return {
            "version": _STATE_VERSION,
            "n": self._n,
            "epoch": int(self.epoch),
            "scores": self._scores.clone(),
            "seen": self._seen.clone(),
            "irreducible": self.irreducible_losses.clone(),
            "groups": {name: (self._group_of == k + 1).nonzero().flatten() for k, name in enumerate(self._group_names)},
            "scales": dict(self._scales),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; a different ``len(dataset)`` is reconciled by :meth:`resize`.

        Raises:
            KeyError: if a key is missing, naming the keys present.
        """
        missing = {"n", "epoch", "scores", "seen", "groups", "scales"} - set(state_dict)
        if missing:
            raise KeyError(f"AdaptiveSampler state is missing {sorted(missing)}; keys present: {sorted(state_dict)}")
        self._n = int(state_dict["n"])
        self._scores = torch.as_tensor(state_dict["scores"], dtype=torch.float64).clone()
        self._seen = torch.as_tensor(state_dict["seen"], dtype=torch.bool).clone()
        stored = state_dict.get("irreducible")  # absent in states written before reducible-loss sampling
        self.irreducible_losses = (torch.full((self._n,), math.nan, dtype=torch.float64) if stored is None
                             else torch.as_tensor(stored, dtype=torch.float64).clone())
        self._group_of = torch.zeros(self._n, dtype=torch.long)
        self._group_names = []
        self._scales = {str(k): float(v) for k, v in state_dict["scales"].items()}
        self.set_groups(dict(state_dict["groups"]))
        self.epoch = int(state_dict["epoch"])
        if len(self.dataset) != self._n:  # type: ignore[arg-type]
            self.resize(len(self.dataset))  # type: ignore[arg-type]
        self._refresh_sizes()
