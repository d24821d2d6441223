"""Where and how much the analyzer probes: the probe plan, the probe segments, sequential stopping, the keyed
per-sample parameters and the carry-over of cells not probed. Plain torch, no Lightning: what needs the
trainer (scoring in the model's precision, summing over ranks, the input range) comes in as callables.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_synth.analysis import ProbeAccuracy, paired_gap_interval
from lightning_synth.ladder import Request, ladder_hits
from lightning_synth.perturbations import Params, Perturbation, PerturbationBank
from lightning_synth.profile import WeaknessProfile
from lightning_synth.value_range import ValueRange

__all__ = ["PerturbationProber"]

ScoreFn = Callable[[Tensor], Tensor]  # perturbed inputs -> (N, C) class logits
RangeFn = Callable[[Tensor], ValueRange]  # inputs -> their value range (the same on every rank)
ReduceFn = Callable[[Tensor], Tensor]  # a tensor summed over ranks (the identity in one process)


class PerturbationProber:
    """Scores a bounded subset of validation samples under each (perturbation, severity) cell of a bank.

    Holds the decision state of :class:`~lightning_synth.callbacks.FailureModeCallback` (which cells to probe,
    when to stop, what the last measurement of each cell was); every decision derives from counts summed over
    ranks, so it is identical on every rank. The callback validates the arguments.

    Args:
        bank: the perturbations to probe with.
        severities: sorted severity levels to probe.
        max_samples: samples (over all ranks) scored under perturbations per pass.
        frontier_threshold: accuracy drop that marks a perturbation's failure frontier.
        full_sweep_every: every N-th analysis probes every severity.
        sequential: stop probing a cell once its place relative to the frontier is settled.
        probe_batch_size: images per probe forward (default: the size of the batch being probed).
        seed: seed of the probe perturbations.
        stages: fractions of the probe budget after which cells stop (see :meth:`stop_mask`; the last one
            is the rank stage).
        param_cache_bytes: probe parameters kept across passes (the probe subset does not change).
        refresh_top: how many cells with the largest last gaps a window pass probes afresh as well (they
            lead the ranking of weaknesses, and a kept measurement of them goes stale as the model trains).
        quick_reads: read the first analysis and perturbations whose frontier moved quickly (every settled
            cell stops at the first stage; see :meth:`stop_mask`): cheaper, rougher rankings.
        ladder_search: find each clean-right sample's breaking level by a search along the ladder
            (:func:`~lightning_synth.ladder.ladder_hits`, ordered by :meth:`survival`) instead of scoring it at
            every planned level.
        exact_band: with ``ladder_search``, cells whose last gap lies this close to ``frontier_threshold``
            are scored on every sample (:meth:`exact_cells`).
        guided_search: with ``ladder_search``, order each search by :meth:`survival` and bound it by the exact
            cells' hits; ``False``: plain bisection over the other levels (the search before this option).

    Example:
        >>> torch.manual_seed(0) and None
        >>> prober = PerturbationProber(PerturbationBank(["rotation"]), (1, 3, 5), max_samples=8)
        >>> prober.start_pass(None, world=1, rank=0, device=torch.device("cpu"))
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
        >>> images, labels = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
        >>> hits, keep = net(images).argmax(1) == labels, torch.ones(8, dtype=torch.bool)
        >>> # 8 samples x 3 levels, less one level of the sample the net gets right (found by bisection)
        >>> int(hits.sum()), prober.probe(images, labels, hits, keep, net, ValueRange.detect, lambda t: t)
        (1, 23)
        >>> prober.finish_pass(lambda t: t).shape  # correct, total, clean_correct, discordant x (P, 1 + S)
        torch.Size([4, 1, 4])
    """

    def __init__(
        self,
        bank: PerturbationBank,
        severities: Sequence[int],
        max_samples: int = 256,
        frontier_threshold: float = 0.1,
        full_sweep_every: int = 5,
        sequential: bool = True,
        probe_batch_size: int | None = None,
        seed: int = 0,
        stages: Sequence[float] = (0.25, 0.625),
        param_cache_bytes: int = 256 * 2**20,
        refresh_top: int = 0,
        quick_reads: bool = False,
        ladder_search: bool = True,
        exact_band: float = 0.05,
        guided_search: bool = True,
    ) -> None:
        self.bank, self.severities = bank, tuple(severities)
        self.max_samples, self.frontier_threshold = max_samples, frontier_threshold
        self.full_sweep_every, self.sequential = full_sweep_every, sequential
        self.probe_batch_size, self.seed = probe_batch_size, seed
        self.stage_fractions, self.param_cache_bytes = tuple(stages), param_cache_bytes
        self.refresh_top, self.quick_reads = refresh_top, quick_reads
        self.ladder_search, self.exact_band, self.guided_search = ladder_search, exact_band, guided_search
        self._param_cache: dict[tuple[Any, ...], Params] = {}
        self._param_cache_size = 0
        # Decision state (identical on every rank: derived from counts summed over ranks)
        self.analyses = 0
        self.full_next = True
        self.moved: set[str] = set()  # perturbations whose frontier moved by more than a level
        self.memory: Tensor | None = None  # (4, P, S + 1) counts of each cell's last measurement
        self._reference: Tensor | None = None  # the latest counts summed over ranks (see exact_cells)
        # Pass state
        self.metric = ProbeAccuracy(len(bank), len(self.severities))
        self.plan: Tensor | None = None  # (P, S) cells to probe this pass
        self.quick = torch.zeros(len(bank), dtype=torch.bool)  # (P,) perturbations read quickly this pass
        self.stages: list[int] = []
        self.seen = 0
        self._world, self._rank = 1, 0

    # ------------------------------------------------------------------------------------- a pass
    def start_pass(self, profile: WeaknessProfile | None, world: int, rank: int, device: torch.device) -> None:
        """Start counting afresh: plan the cells from the last ``profile`` and place the sequential stages."""
        self.metric = ProbeAccuracy(len(self.bank), len(self.severities)).to(device)
        self.seen = 0
        self.plan = self.probe_plan(profile)
        self._reference = self.memory
        # Perturbations read quickly this pass (settled cells stop at the first stage), with ``quick_reads``:
        # all on the first analysis, else those whose frontier moved by more than a level.
        self.quick = torch.tensor([self.quick_reads and (self.memory is None or n in self.moved)
                                   for n in self.bank.names])
        self._world, self._rank = world, rank
        per_rank = math.ceil(self.max_samples / world)
        stages = {math.ceil(per_rank * f) for f in self.stage_fractions} if self.sequential else set()
        self.stages = sorted(s for s in stages if 0 < s < per_rank)

    def wants(self, n: int) -> bool:
        """Whether a batch of ``n`` samples would be probed (budget left and a plan)."""
        return self._take(n) > 0 and self.plan is not None

    def _take(self, n: int) -> int:
        budget = math.ceil(self.max_samples / self._world) - self.seen
        return max(min(budget, n), 0)

    def probe(
        self, inputs: Any, targets: Tensor, hits: Tensor, keep: Tensor, score: ScoreFn, value_range: RangeFn,
        reduce_sum: ReduceFn,
    ) -> int:
        """Probe the leading samples of a batch that fit the budget, stopping settled cells at each stage.

        ``hits`` are the clean predictions' hits, ``keep`` the samples that count. Returns the number of
        perturbed images scored.
        """
        take = self._take(len(targets))
        if take == 0 or self.plan is None:
            return 0
        scored, start = 0, 0
        while start < take:
            stop = take
            for stage in self.stages:
                if self.seen < stage < self.seen + (take - start):
                    stop = start + stage - self.seen
                    break
            scored += self._probe_segment(inputs[start:stop], targets[start:stop], hits[start:stop],
                                          keep[start:stop], score, value_range)
            self.seen += stop - start
            start = stop
            if self.seen in self.stages:
                self._sequential_stop(reduce_sum)
        return scored

    def finish_pass(self, reduce_sum: ReduceFn) -> Tensor:
        """The counts of this pass summed over ranks, with the last measurement of cells not probed."""
        counts = reduce_sum(self.metric.counts().clone()).double().cpu()
        return self._carry_over(counts)

    def after_analysis(self, profile: WeaknessProfile, previous: WeaknessProfile | None) -> None:
        """Note which frontiers moved by more than a level since the ``previous`` profile (after the first
        analysis: since the top severity, so the second analysis reads the whole ladder of every perturbation
        whose frontier lies lower)."""
        before = previous.frontier if previous is not None else {}
        top = float(max(self.severities))
        self.moved = {n for n in self.bank.names
                      if abs((profile.frontier.get(n) or top) - (before.get(n) or top)) > 1.0}
        self.full_next = self.memory is None
        self.analyses += 1

    # ------------------------------------------------------------------------------------- planning
    def probe_plan(self, profile: WeaknessProfile | None) -> Tensor:
        """Which (perturbation, severity) cells to probe: all on a full sweep, else a window of one level
        around each perturbation's last frontier, the whole ladder of a perturbation whose frontier moved by
        more than a level, and the ``refresh_top`` cells with the largest last gaps (a deterministic
        function of synced state, so identical on every rank)."""
        plan = torch.ones(len(self.bank), len(self.severities), dtype=torch.bool)
        full = self.full_next or self.memory is None or profile is None or (
            self.analyses % self.full_sweep_every == 0)
        if full:
            return plan
        assert profile is not None
        sev = torch.tensor(self.severities, dtype=torch.float64)
        for p, name in enumerate(self.bank.names):
            front = profile.frontier.get(name)
            if name in self.moved:
                continue
            if front is None:  # never reached the threshold: watch the top two levels
                plan[p] = sev >= sev[-min(2, len(sev))]
            else:  # the level nearest the frontier, one below and one above
                near = math.floor(front + 0.5)
                plan[p] = (sev >= near - 1) & (sev <= near + 1)
        if self.refresh_top and self.memory is not None:
            gap = paired_gap_interval(self.memory[:, :, 1:])[0].flatten()
            order = torch.sort(gap, descending=True, stable=True).indices[: self.refresh_top]
            plan.view(-1)[order] = True
        return plan

    def _probe_segment(
        self, inputs: Tensor, targets: Tensor, hits: Tensor, keep: Tensor, score: ScoreFn, value_range: RangeFn,
    ) -> int:
        assert self.plan is not None
        clean = hits[keep.to(hits.device)]
        self.metric.update(slice(None), 0, clean.unsqueeze(0).expand(len(self.bank), -1))
        if not len(clean) or not bool(self.plan.any()):
            return 0
        exact = self.exact_cells() if self.ladder_search else torch.ones_like(self.plan)
        cells, scored = ladder_hits(self.plan, exact, clean, self._scorer(inputs, targets, keep, score, value_range),
                                    self.survival() if self.guided_search else None, self.guided_search)
        for (p, s), row in cells.items():
            self.metric.update(p, s + 1, row.to(clean.device), clean)
        return scored

    def exact_cells(self) -> Tensor:
        """``(P, S)`` cells the ladder search scores on every sample: those whose gap, in the last counts summed
        over ranks (this pass's latest stage, the last measurement for the others), lies within
        ``exact_band`` of the frontier threshold; none before the first counts."""
        if self._reference is None:
            return torch.zeros(len(self.bank), len(self.severities), dtype=torch.bool)
        gap = paired_gap_interval(self._reference[:, :, 1:])[0]
        return (gap - self.frontier_threshold).abs() <= self.exact_band

    def survival(self) -> Tensor | None:
        """``(P, S)`` share of clean-right probe samples still right at each cell, in the last counts summed over
        ranks (see :meth:`exact_cells`; NaN where a cell has none): the ladder search's odds. ``None`` before
        the first counts."""
        if self._reference is None:
            return None
        correct, _, clean, discordant = self._reference[:, :, 1:].double()
        both = (correct + clean - discordant) / 2  # right clean and perturbed: discordant = right->wrong + wrong->right
        return torch.where(clean > 0, both / clean.clamp(min=1), torch.nan)

    def _scorer(self, inputs: Tensor, targets: Tensor, keep: Tensor, score: ScoreFn, value_range: RangeFn
                ) -> Callable[[list[Request]], list[Tensor]]:
        """Scores ladder requests on the kept samples of a segment: perturbed copies concatenated into forwards
        of ``probe_batch_size`` images (default: the segment's size), all full but the last of a round."""
        # The validation sampler shards round-robin, so local position p on rank r is dataset index p*W+r:
        # seeding each sample by that index gives the same perturbation as in a single process.
        positions = torch.arange(self.seen, self.seen + len(targets))
        seeds = (positions * self._world + self._rank + self.seed * 1_000_003)[keep.cpu()]
        keep = keep.to(inputs.device)
        images, labels = inputs[keep], targets[keep]
        vr = value_range(images)
        unit = vr.to_unit(images)
        chunk = self.probe_batch_size or max(len(targets), 1)
        ops = list(self.bank)

        def scorer(requests: list[Request]) -> list[Tensor]:
            preds: list[Tensor] = []
            queue: list[Tensor] = []  # perturbed images not scored yet: fewer than `chunk`
            for p, s, idx in requests:
                op: Perturbation = ops[p]
                params = self._probe_params(op, unit.shape, self.severities[s], seeds, idx)
                queue.append(vr.from_unit(op.apply(unit[idx.to(unit.device)], params)).to(inputs.dtype))
                if sum(len(q) for q in queue) >= chunk:  # full forwards; a request may span two
                    pending = torch.cat(queue)
                    full = len(pending) // chunk * chunk
                    preds += [score(pending[i:i + chunk]).argmax(-1) for i in range(0, full, chunk)]
                    queue = [pending[full:]] if full < len(pending) else []
            if queue:
                preds.append(score(torch.cat(queue)).argmax(-1))
            rows = torch.cat([idx for _, _, idx in requests])
            correct = torch.cat(preds) == labels[rows.to(labels.device)].to(preds[0].device)
            return list(correct.split([len(idx) for _, _, idx in requests]))

        return scorer

    def _sequential_stop(self, reduce_sum: ReduceFn) -> None:
        """Stop the cells whose measurement is good enough for what it decides (on counts summed over ranks,
        so every rank stops the same cells); see :meth:`stop_mask`."""
        if self.plan is None:
            return
        counts = self._with_memory(reduce_sum(self.metric.counts().clone()).cpu())  # cells outside the plan
        self._reference = counts
        rank_stage = self.seen >= self.stages[-1] if self.stages else True
        stop = self.stop_mask(counts[:, :, 1:], self.frontier_threshold, rank_stage, self.quick)
        self.plan = self.plan & ~stop

    @staticmethod
    def stop_mask(counts: Tensor, threshold: float, rank_stage: bool, quick: Tensor | None = None) -> Tensor:
        """Which cells may stop, from ``(4, P, S)`` counts (severities in ladder order).

        A cell *settles* once the confidence interval of its gap lies on one side of ``threshold``. How long
        a cell is measured follows from what it decides:

        - Before the ``rank_stage`` (the last stage), a level settled below the threshold stops, except the
          highest one under a level that is not settled below (it brackets the frontier, and an early read
          on the probe subset's first samples can be far off: their errors are shared by every cell).
        - At the ``rank_stage`` every level stops but the unsettled ones at or below the crossing (the
          first level whose gap reads at or over the threshold, else the top level): any of them may turn
          out to be the frontier, so they run the whole budget. Levels settled above the threshold are
          measured up to here, not stopped at the first stage: they are the largest weaknesses, and gaps
          read on a quarter of the subset rank them too noisily.
        - Rows where ``quick`` (``(P,)`` bool) is set are read quickly instead: every settled level stops at
          the first stage it settles (a prober with ``quick_reads`` sets it for the first analysis and for
          perturbations whose frontier moved by more than a level: cheaper first analyses, but gaps read on
          a quarter of the subset rank the largest weaknesses too noisily).

        Example:
            >>> n = torch.full((1, 4), 64.0)  # one perturbation, 4 levels, 64 samples each
            >>> flips = torch.tensor([[0.0, 0.0, 4.0, 40.0]])  # perturbed errors, each a flip of a clean hit
            >>> counts = torch.stack([n - flips, n, n, flips])  # levels 1-2 settle below, 4 above, 3 does not
            >>> PerturbationProber.stop_mask(counts, 0.1, rank_stage=False).tolist()  # level 2: the bracket
            [[True, False, False, False]]
            >>> PerturbationProber.stop_mask(counts, 0.1, rank_stage=True).tolist()  # level 3 may be the frontier
            [[True, True, False, True]]
            >>> PerturbationProber.stop_mask(counts, 0.1, rank_stage=False, quick=torch.tensor([True])).tolist()
            [[True, True, False, True]]
        """
        gap, low, high = paired_gap_interval(counts)
        seen = counts[1] > 0
        below, above = seen & (high < threshold), seen & (low > threshold)
        levels = torch.arange(below.shape[-1]).expand_as(below)
        top = below.shape[-1]
        if not rank_stage:
            first_open = torch.where(~below, levels, top).amin(-1, keepdim=True)
            stop = below & (levels != first_open - 1)
        else:
            crossing = torch.where(seen & (gap >= threshold), levels, top - 1).amin(-1, keepdim=True)
            stop = seen & ~((levels <= crossing) & ~below & ~above)
        if quick is not None:
            stop = torch.where(quick.unsqueeze(-1), below | above, stop)
        return stop

    def _probe_params(self, op: Perturbation, shape: torch.Size, severity: int, seeds: Tensor, rows: Tensor
                      ) -> Params:
        """Per-sample probe parameters of the ``rows`` of a segment's samples. Keyed draws are made for those
        rows alone (a sample's draw depends on its seed only); the others are drawn for the whole segment and
        cached across epochs (the probe subset is the same every analysis)."""
        if op.keyed_draws:
            return op.sample_params_per_sample(torch.Size((len(rows), *shape[1:])), severity, seeds[rows])
        key = (op.name, severity, tuple(shape), tuple(seeds.tolist()))
        params = self._param_cache.get(key)
        if params is None:
            params = op.sample_params_per_sample(shape, severity, seeds)
            size = sum(v.numel() * v.element_size() for v in params.values())
            if self._param_cache_size + size <= self.param_cache_bytes:
                self._param_cache[key] = params
                self._param_cache_size += size
        if len(rows) == len(seeds):
            return params
        return {k: v[rows] if v.ndim and v.shape[0] == len(seeds) else v for k, v in params.items()}

    def _with_memory(self, counts: Tensor) -> Tensor:
        """``counts`` with every cell not probed this pass replaced by its last measurement (the clean column
        is counted on every pass)."""
        if self.memory is None or self.memory.shape != counts.shape:
            return counts
        fresh = counts[1] > 0
        fresh[:, 0] = True
        return torch.where(fresh.unsqueeze(0), counts, self.memory.to(counts.dtype))

    def _carry_over(self, counts: Tensor) -> Tensor:
        """Cells not probed this pass keep their last measurement (counts and paired gap)."""
        counts = self._with_memory(counts)
        if bool((counts[1, :, 1:] > 0).any()):
            self.memory = counts.clone()
        return counts

    # ------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The decision state, in the keys of the callback's checkpoint."""
        return {
            "analyses": self.analyses,
            "full_next": self.full_next,
            "moved": sorted(self.moved),
            "memory": None if self.memory is None else self.memory.tolist(),
        }

    def load_state_dict(self, state_dict: dict[str, Any], analyses: int = 0) -> None:
        """Restore :meth:`state_dict` (``analyses`` when a checkpoint predates the key); a memory of another
        bank or ladder is dropped, so the next pass is a full sweep."""
        self.analyses = int(state_dict.get("analyses", analyses))
        self.full_next = bool(state_dict.get("full_next", True))
        self.moved = set(state_dict.get("moved", []))
        memory = state_dict.get("memory")
        self.memory = None if memory is None else torch.tensor(memory, dtype=torch.float64)
        if self.memory is not None and tuple(self.memory.shape[1:]) != (len(self.bank), len(self.severities) + 1):
            self.memory, self.full_next = None, True
