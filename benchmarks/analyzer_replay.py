# python -m benchmarks.analyzer_replay
# (from the repository root; ~4 min per seed on 2 shared cores)
"""What the analyzer's probing rules cost and how they agree with a full sweep, over several training seeds, by
replaying recorded probe hits.

The training is :mod:`benchmarks.analyzer_cost`'s (Fashion-MNIST, ``ImageClassifier(arch="cnn")``, one epoch per
checkpoint, train mode). At each checkpoint a full sweep (``full_sweep_every=1, sequential=False``) runs on the
same weights with every probe hit recorded: for each (perturbation, severity) cell, whether each of the
``max_samples`` probe samples was classified correctly, and the clean hits of the same samples. A probe
sample's perturbation is keyed by (seed, sample index), so a cell probed on the first ``n`` samples sees exactly
the first ``n`` recorded hits: a rule can be replayed on the records without a model, and its probe forwards and
profiles are the ones it would produce live. The live default callback runs at every checkpoint too, and the
replay of the defaults must reproduce its probe forwards and agreement exactly (``fidelity`` in the JSON).

Rules replayed (:data:`RULES`):

- ``defaults``: :class:`~lightning_synth.callbacks.FailureModeCallback`'s rule (window passes; stages at 1/4 and
  5/8 of the budget, the last one the rank stage; the same stop rule on every pass; the ladder search, cells
  within 0.05 of the threshold scored on every sample).
- ``no_ladder_search``: the defaults before the ladder search (every planned cell scored on every sample);
  ``bisection_search``: the ladder search before session 10 (plain bisection, not ordered by the last counts
  nor bounded by the exact cells' hits);
  ``exact_band_0.03`` and ``exact_band_0.08``: the ladder search with a narrower or wider exact band.
- ``rank_at_half`` and ``rank_at_3_4``: the defaults with the rank stage at a half or three quarters of the
  budget.
- ``quick_reads_rank_at_half``: the callback's earlier defaults (``quick_reads=True``, rank stage at a half:
  every settled cell stops at the first stage on the first analysis and for moved frontiers; no ladder search).
- ``all_at_half``: every cell on the first half of the probe samples (a fixed budget, no sequential rule, no
  ladder search).
- Replay-only rules (the callback has no option for them; they test cheaper ways to read the first analyses,
  which set the cost of a short fit): ``window_second`` (the second analysis is a window pass around the first
  one's frontiers, instead of the whole ladder of every perturbation whose frontier lies more than a level
  below the top severity), ``window_second_rank_at_half`` (the same with the rank stage at a half),
  ``later_rank_at_half`` (the first analysis as the defaults, every later pass with the rank stage at a half) and
  ``first_rank_at_half`` (the first analysis with the rank stage at a half, later passes as the defaults).

Agreement as in :mod:`benchmarks.analyzer_cost`: Spearman correlation of the full sweep's top-20 weaknesses and
the largest frontier difference (targets 0.9 and 0.5 level). Cost as the share of a full sweep's probe forwards,
over all checkpoints and over the first two (the two analyses of the README demo's 2-epoch fit). Writes
``<results-dir>/analyzer_replay.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from benchmarks.analyzer_cost import VARIANTS, agreement, make_trainer, run_validate
from benchmarks.common import RESULTS_DIR, format_table, machine_info, quiet_lightning, write_json
from lightning_synth.analysis import ProbeAccuracy, build_profile
from lightning_synth.callbacks import failure_mode
from lightning_synth.callbacks.failure_mode import FailureModeCallback
from lightning_synth.datasets import FashionMNISTDataModule
from lightning_synth.demos import ImageClassifier
from lightning_synth.probing import PerturbationProber
from lightning_synth.profile import WeaknessProfile

RULES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "no_ladder_search": {"ladder_search": False},
    "bisection_search": {"guided_search": False},
    "exact_band_0.03": {"exact_band": 0.03},
    "exact_band_0.08": {"exact_band": 0.08},
    "rank_at_half": {"stages": (0.25, 0.5)},
    "rank_at_3_4": {"stages": (0.25, 0.75)},
    "quick_reads_rank_at_half": {"quick_reads": True, "stages": (0.25, 0.5), "ladder_search": False},
    "all_at_half": {"fixed": 0.5, "ladder_search": False},
    "window_second": {"window_second": True},
    "window_second_rank_at_half": {"window_second": True, "stages": (0.25, 0.5)},
    "later_rank_at_half": {"later_stages": (0.25, 0.5)},
    "first_rank_at_half": {"stages": (0.25, 0.5), "later_stages": (0.25, 0.625)},
}
RHO_TARGET, FRONTIER_TARGET = 0.9, 0.5


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="training seeds")
    parser.add_argument("--val-size", type=int, default=2000, help="validation samples")
    parser.add_argument("--train-size", type=int, default=10000, help="training samples")
    parser.add_argument("--checkpoints", type=int, default=4, help="training epochs, one checkpoint after each")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-samples", type=int, default=256, help="probe samples (the callback's default)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    for flag, value in (("--val-size", args.val_size), ("--train-size", args.train_size),
                        ("--checkpoints", args.checkpoints), ("--batch-size", args.batch_size),
                        ("--max-samples", args.max_samples)):
        if value < 1:
            raise ValueError(f"`{flag}` must be >= 1, got {value}")
    return args


# ------------------------------------------------------------------------------------------------ recording
@contextmanager
def recording() -> Iterator[dict[str, Any]]:
    """Inside the block, every ``ProbeAccuracy.update`` call as ``(perturbation, severity, hits)`` (``"calls"``)
    and the confusion matrix the callback builds its profile from (``"confusion"``)."""
    record: dict[str, Any] = {"calls": [], "confusion": None}
    update, build = ProbeAccuracy.update, failure_mode.build_profile

    def recorded_update(self: ProbeAccuracy, perturbation: Any, severity: Any, hits: Tensor,
                        clean_hits: Any = None) -> None:
        record["calls"].append((perturbation, severity, hits.detach().cpu().clone()))
        update(self, perturbation, severity, hits, clean_hits)

    def recorded_build(confusion: Tensor, *args: Any, **kwargs: Any) -> WeaknessProfile:
        record["confusion"] = confusion.detach().cpu().clone()
        return build(confusion, *args, **kwargs)

    ProbeAccuracy.update = recorded_update  # type: ignore[method-assign]
    failure_mode.build_profile = recorded_build
    try:
        yield record
    finally:
        ProbeAccuracy.update = update  # type: ignore[method-assign]
        failure_mode.build_profile = build


def hits_table(calls: list[tuple[Any, Any, Tensor]], num_perturbations: int, num_severities: int
               ) -> tuple[Tensor, Tensor]:
    """A full sweep's update calls as ``(P, S, N)`` perturbed hits and ``(N,)`` clean hits, in sample order."""
    clean: list[Tensor] = []
    cells: dict[tuple[int, int], list[Tensor]] = {}
    for perturbation, severity, hits in calls:
        if isinstance(perturbation, slice):  # the clean column, one row per perturbation
            clean.append(hits[0])
        else:
            cells.setdefault((int(perturbation), int(severity) - 1), []).append(hits)
    clean_hits = torch.cat(clean)
    table = torch.zeros(num_perturbations, num_severities, len(clean_hits), dtype=torch.bool)
    for (p, s), rows in cells.items():
        table[p, s] = torch.cat(rows)
    return table, clean_hits


def record_seed(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train, and at each checkpoint record the full sweep's hits and the live default analyzer's figures."""
    L.seed_everything(seed, verbose=False)
    dm = FashionMNISTDataModule(batch_size=args.batch_size, val_size=args.val_size, train_size=args.train_size,
                                seed=seed)
    dm.setup()
    model = ImageClassifier(num_classes=10, in_channels=1, image_size=28, arch="cnn")
    live = FailureModeCallback(max_samples=args.max_samples, pictures=False)
    checkpoints: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as root:
        run_validate(model, dm, root, FailureModeCallback(max_samples=16, pictures=False))  # as analyzer_cost
        for epoch in range(args.checkpoints):
            model.train()
            make_trainer(root, [], max_epochs=1, limit_val_batches=0).fit(model, datamodule=dm)
            run_validate(model, dm, root, None)
            full = FailureModeCallback(max_samples=args.max_samples, pictures=False, **VARIANTS["full"])
            with recording() as recorded:
                run_validate(model, dm, root, full)
            _, forwards = run_validate(model, dm, root, live)
            assert full.profile is not None and live.profile is not None
            hits, clean = hits_table(recorded["calls"], len(full.bank), len(full.severities))
            checkpoints.append({
                "hits": hits, "clean": clean, "confusion": recorded["confusion"], "full": full.profile,
                "live": {"forwards": forwards, **_agreement(live.profile, full.profile, full.severities)},
            })
            print(f"  seed {seed} checkpoint {epoch}: recorded; live defaults {forwards} forwards", flush=True)
    return {"names": list(live.bank.names), "severities": list(live.severities), "checkpoints": checkpoints}


def _agreement(cheap: WeaknessProfile, full: WeaknessProfile, severities: Sequence[int]) -> dict[str, float]:
    a = agreement(cheap, full, float(max(severities)))
    return {"top20_spearman": a["top20_spearman"], "max_frontier_diff": a["max_frontier_diff"]}


# ------------------------------------------------------------------------------------------------ replaying
class ReplayProber(PerturbationProber):
    """A :class:`PerturbationProber` whose probe requests read recorded hits instead of running the model;
    everything else (plans, stages, stop rules, ladder search, carry-over) is the prober's own.

    Replay-only rules: ``fixed`` probes every cell on that share of the samples (a fixed budget);
    ``window_second`` makes the second analysis a window pass around the first one's frontiers (no perturbation
    counts as moved after the first analysis); ``later_stages`` are the stage fractions of every pass after the
    first (default: the same as the first).
    """

    def __init__(self, *args: Any, fixed: float | None = None, window_second: bool = False,
                 later_stages: Sequence[float] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fixed, self.window_second = fixed, window_second
        self.first_stages = self.stage_fractions
        self.later_stages = tuple(later_stages) if later_stages is not None else self.stage_fractions
        self.hits: Tensor = torch.zeros(0, dtype=torch.bool)
        self.clean: Tensor = torch.zeros(0, dtype=torch.bool)  # the recorded clean hits (``probe``'s ``hits``)

    def _scorer(self, inputs: Tensor, targets: Tensor, keep: Tensor, score: Any, value_range: Any) -> Any:
        offset = self.seen  # the segment's first probe sample
        return lambda requests: [self.hits[p, s, offset + idx] for p, s, idx in requests]

    def start_pass(self, profile: WeaknessProfile | None, world: int, rank: int, device: torch.device) -> None:
        self.stage_fractions = self.first_stages if self.analyses == 0 else self.later_stages
        super().start_pass(profile, world, rank, device)

    def after_analysis(self, profile: WeaknessProfile, previous: WeaknessProfile | None) -> None:
        super().after_analysis(profile, previous)
        if self.window_second and previous is None:
            self.moved = set()

    def _sequential_stop(self, reduce_sum: Any) -> None:
        if self.fixed is not None and self.plan is not None:
            self.plan = self.plan & False  # the one stage is the fixed budget
            return
        super()._sequential_stop(reduce_sum)


def _no_model(inputs: Tensor) -> Any:
    raise AssertionError("a replay reads recorded hits: it never scores images")


def replay(record: dict[str, Any], rule: dict[str, Any], max_samples: int, batch_size: int) -> list[dict[str, Any]]:
    """One rule over one seed's checkpoints (one prober carried across them, as in training)."""
    defaults = FailureModeCallback(max_samples=max_samples, pictures=False)
    live = defaults.prober  # the prober the callback builds: every setting a rule does not change is its own
    names, severities = record["names"], record["severities"]
    fixed = rule.get("fixed")
    prober = ReplayProber(
        live.bank, live.severities, live.max_samples, live.frontier_threshold,
        1 if fixed is not None else live.full_sweep_every, live.sequential, live.probe_batch_size, live.seed,
        stages=(fixed,) if fixed is not None else rule.get("stages", live.stage_fractions),
        param_cache_bytes=0, refresh_top=live.refresh_top, quick_reads=rule.get("quick_reads", live.quick_reads),
        ladder_search=rule.get("ladder_search", live.ladder_search), exact_band=rule.get("exact_band", live.exact_band),
        guided_search=rule.get("guided_search", live.guided_search),
        fixed=fixed, window_second=rule.get("window_second", False), later_stages=rule.get("later_stages"),
    )
    rows: list[dict[str, Any]] = []
    previous: WeaknessProfile | None = None
    identity = lambda t: t  # noqa: E731
    for index, checkpoint in enumerate(record["checkpoints"]):
        prober.hits, prober.clean = checkpoint["hits"], checkpoint["clean"]
        prober.start_pass(previous, 1, 0, torch.device("cpu"))
        forwards = 0
        for start in range(0, len(prober.clean), batch_size):
            n = min(batch_size, len(prober.clean) - start)
            ones, clean = torch.ones(n, dtype=torch.bool), prober.clean[start:start + n]
            forwards += prober.probe(ones, torch.zeros(n, dtype=torch.long), clean, ones, _no_model, _no_model,
                                     identity)
        counts = prober.finish_pass(identity)
        profile = build_profile(
            checkpoint["confusion"], counts[0], counts[1], names, severities, {}, threshold=defaults.frontier_threshold,
            top_k_confusions=defaults.top_k_confusions, min_support=defaults.min_support, epoch=index,
            probe_clean_correct=counts[2],
        )
        prober.after_analysis(profile, previous)
        previous = profile
        rows.append({"forwards": forwards, **_agreement(profile, checkpoint["full"], severities)})
    return rows


def summarize(per_seed: dict[str, list[dict[str, Any]]], full_forwards: int) -> dict[str, Any]:
    rows = [r for seed_rows in per_seed.values() for r in seed_rows]
    rhos = [r["top20_spearman"] for r in rows]
    diffs = [r["max_frontier_diff"] for r in rows]
    first_two = [r for seed_rows in per_seed.values() for r in seed_rows[:2]]
    return {
        "forward_share_of_full": sum(r["forwards"] for r in rows) / (full_forwards * len(rows)),
        "first_two_share_of_full": sum(r["forwards"] for r in first_two) / (full_forwards * len(first_two)),
        "top20_spearman_min": min(rhos), "top20_spearman_median": statistics.median(rhos),
        "max_frontier_diff_max": max(diffs),
        "checkpoints_meeting_both": sum(r >= RHO_TARGET and d <= FRONTIER_TARGET for r, d in zip(rhos, diffs)),
        "checkpoints": len(rows),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    quiet_lightning()
    machine = machine_info()
    torch.set_num_threads(1)
    command = shlex.join(["python", "-m", "benchmarks.analyzer_replay", *(sys.argv[1:] if argv is None else argv)])
    results: dict[str, dict[str, list[dict[str, Any]]]] = {name: {} for name in RULES}
    fidelity: dict[str, Any] = {}
    full_forwards = 0
    for seed in args.seeds:
        record = record_seed(seed, args)
        full_forwards = len(record["names"]) * len(record["severities"]) * args.max_samples
        for name, rule in RULES.items():
            results[name][str(seed)] = replay(record, rule, args.max_samples, args.batch_size)
        live = [c["live"] for c in record["checkpoints"]]
        fidelity[str(seed)] = {"live": live, "replayed_defaults_equal_live": live == results["defaults"][str(seed)]}
        if not fidelity[str(seed)]["replayed_defaults_equal_live"]:
            raise RuntimeError(f"seed {seed}: the replayed defaults differ from the live analyzer: "
                               f"{results['defaults'][str(seed)]} vs {live}")
    summary = {name: summarize(per_seed, full_forwards) for name, per_seed in results.items()}
    rows = [[name, f"{s['forward_share_of_full']:.0%}", f"{s['first_two_share_of_full']:.0%}",
             f"{s['top20_spearman_min']:.3f}",
             f"{s['top20_spearman_median']:.3f}", f"{s['max_frontier_diff_max']:.2f}",
             f"{s['checkpoints_meeting_both']}/{s['checkpoints']}"] for name, s in summary.items()]
    print()
    print(format_table(["rule", "probe forwards (of full)", "first two checkpoints", "top-20 rho min", "median",
                        "max frontier diff", "checkpoints meeting both targets"], rows))
    payload = {
        "benchmark": "analyzer_replay", "command": command, "machine": machine,
        "config": {"seeds": args.seeds, "val_size": args.val_size, "train_size": args.train_size,
                   "checkpoints": args.checkpoints, "batch_size": args.batch_size, "max_samples": args.max_samples,
                   "rules": {k: {key: list(v) if isinstance(v, tuple) else v for key, v in rule.items()}
                             for k, rule in RULES.items()},
                   "targets": {"top20_spearman": RHO_TARGET, "max_frontier_diff": FRONTIER_TARGET}},
        "fidelity": fidelity, "results": results, "summary": summary,
    }
    path = write_json(args.results_dir / "analyzer_replay.json", payload)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
