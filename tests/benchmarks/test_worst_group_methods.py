"""The worst-group benchmark's methods added for issue 14: DFR, recolour_uniform, the GAN headline, paired CIs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")

from benchmarks import worst_group
from benchmarks.worst_group import (
    LAYOUT,
    ColouredFashionMNISTDataModule,
    UniformRecolour,
    paired_differences,
    tint,
)
from lightning_synth.callbacks import SliceBalancedRefit
from lightning_synth.generators.base import GenerationContext
from lightning_synth.profile import WeaknessProfile

TINY = ["--epochs", "1", "--train-size", "256", "--val-size", "200", "--heldout-size", "300", "--test-size", "300",
        "--batch-size", "64", "--width", "8", "--accelerator", "cpu", "--gan-steps", "4", "--gan-width", "4",
        "--plugins"]


def test_heldout_split_is_disjoint_and_colour_independent() -> None:
    dm = ColouredFashionMNISTDataModule(val_size=500, heldout_size=2000, train_size=1000, seed=0)
    dm.setup("fit")
    assert dm.heldout_set is not None and dm.train_set is not None and dm.val_set is not None
    assert len(dm.heldout_set) == 2000 and len(dm.train_set) == 1000
    agree = float((dm.heldout_set.colours == dm.heldout_set.labels % 10).float().mean())
    assert agree < 0.2  # independent colours (about 0.1), unlike training's 0.95
    x, y, slices = next(iter(dm.heldout_dataloader(batch_size=8)))
    assert x.shape == (8, 3, 28, 28) and set(slices) == {"group", "colour"}
    assert torch.equal(slices["group"], LAYOUT.group(y, slices["colour"]))
    with pytest.raises(RuntimeError, match="heldout_size > 0"):
        no_heldout = ColouredFashionMNISTDataModule(val_size=500, train_size=100)
        no_heldout.setup("fit")
        no_heldout.heldout_dataloader()


def test_uniform_recolour_keeps_labels_and_spreads_colours() -> None:
    grey, labels = torch.rand(64, 1, 28, 28), torch.arange(64) % 10
    context = GenerationContext(tint(grey, labels % 10), labels, 10, torch.Generator().manual_seed(0))
    batch = UniformRecolour().generate(WeaknessProfile(), 400, context)
    colours = batch.inputs.amax((2, 3)).argmax(1)  # the brightest channel says red/green/blue-ish
    assert len(batch) == 400 and len(set(colours.tolist())) == 3 and set(batch.targets.tolist()) == set(range(10))


def test_paired_differences_need_two_shared_seeds() -> None:
    runs = {"a": {0: {"m": 0.5}, 1: {"m": 0.7}, 2: {"m": 0.6}}, "b": {0: {"m": 0.4}, 2: {"m": 0.5}}, "c": {0: {"m": 0}}}
    [row] = paired_differences(runs, [("a", "b"), ("a", "c"), ("a", "missing")], ["m"])
    assert row["n"] == 2 and row["pair"] == "a - b" and row["mean"] == pytest.approx(0.1)
    assert row["low"] == pytest.approx(0.1) == row["high"]  # identical differences: a zero-width interval


@pytest.mark.slow
def test_worst_group_new_methods_smoke(tmp_path: Path) -> None:
    worst_group.main([*TINY, "--seeds", "0", "1", "--methods", "dfr", "recolour_uniform", "lightning_synth",
                      "ls_no_gan", "--gan-slice", "colour", "--results-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "worst_group.json").read_text())
    assert set(saved["summary"]) == {"dfr", "recolour_uniform", "lightning_synth", "lightning_synth_before_refit",
                                     "ls_no_gan"}
    assert "gan_seconds" not in saved["runs"]["ls_no_gan"]["0"]["info"]
    run = saved["runs"]["lightning_synth"]["0"]
    before = saved["runs"]["lightning_synth_before_refit"]["0"]
    assert before["train_seconds"] == run["train_seconds"] and before["average"] != run["average"]
    assert run["info"]["gan_steps"] == 4 and run["info"]["gan_seconds"] > 0
    assert saved["summary"]["lightning_synth"]["extra_seconds"]["mean"] > 0
    pairs = {(p["pair"], p["metric"]) for p in saved["paired"]}
    assert ("lightning_synth - dfr", "worst_decile") in pairs and all(p["n"] == 2 for p in saved["paired"])
    assert ("lightning_synth - lightning_synth_before_refit", "worst_group") in pairs
    assert ("lightning_synth - ls_no_gan", "worst_group") in pairs


def test_dfr_refits_plainly_and_the_ablations_use_the_library_refit() -> None:
    dm = ColouredFashionMNISTDataModule(val_size=100, train_size=100, test_size=100, heldout_size=100)
    dfr = worst_group.make_dfr(weight_decay=1e-5).make_callbacks(None, dm)  # type: ignore[arg-type]
    [plain] = [c for c in dfr if isinstance(c, SliceBalancedRefit)]
    assert (plain.dro_step_size, plain.weight_decay) == (0.0, 1e-5)
    [library] = worst_group.make_erm_refit().make_callbacks(None, dm)  # type: ignore[arg-type]
    default = SliceBalancedRefit([])
    assert isinstance(library, SliceBalancedRefit)
    assert (library.dro_step_size, library.uniform_floor, library.weight_decay) == (
        default.dro_step_size, default.uniform_floor, default.weight_decay)
    context = GenerationContext(torch.rand(4, 3, 28, 28), torch.arange(4), 10, torch.Generator())
    assert len(worst_group.NoSamples().generate(WeaknessProfile(), 16, context)) == 0


@pytest.mark.slow
def test_merge_pools_seeds_from_two_results_files(tmp_path: Path) -> None:
    for seed in ("0", "1"):
        worst_group.main([*TINY, "--seeds", seed, "--methods", "erm_refit", "dfr", "--results-dir",
                          str(tmp_path / seed)])
    merged = worst_group.main([*TINY, "--merge", str(tmp_path / "0" / "worst_group.json"),
                               str(tmp_path / "1" / "worst_group.json"), "--results-dir", str(tmp_path / "all")])
    saved = json.loads((tmp_path / "all" / "worst_group.json").read_text())
    assert sorted(saved["runs"]["dfr"]) == ["0", "1"] and merged["config"]["merged_commits"]
    [pair] = [p for p in saved["paired"] if p["pair"] == "erm_refit - dfr" and p["metric"] == "worst_group"]
    assert pair["n"] == 2  # one seed from each file
    # a later file's run of a method and seed replaces an earlier one (a re-run), and the JSON says which
    files = [str(tmp_path / d / "worst_group.json") for d in ("0", "1", "0")]
    worst_group.main([*TINY, "--merge", *files, "--results-dir", str(tmp_path / "rerun")])
    rerun = json.loads((tmp_path / "rerun" / "worst_group.json").read_text())
    assert rerun["runs"] == saved["runs"]
    assert rerun["config"]["merged_sources"]["dfr"] == {"0": files[2], "1": files[1]}
