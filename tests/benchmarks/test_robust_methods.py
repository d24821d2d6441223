import inspect
import os
import warnings

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")

from benchmarks import methods as methods_module
from benchmarks.common import MethodContext, budget, build_method, export_torchscript, run_method
from benchmarks.robustness import family_score, paired, per_seed_metrics
from lightning_synth.callbacks import FailureModeCallback
from lightning_synth.consistency import MixingChains, jsd_consistency
from lightning_synth.data import SyntheticDataModule
from lightning_synth.datasets import DigitsDataModule
from lightning_synth.generators import TargetedAugmentation


def _ctx(tmp_path, exclude=()):
    steps_per_epoch, max_steps = budget(train_size=997, batch_size=128, epochs=1)
    return MethodContext(task="robustness", seed=0, in_channels=1, num_classes=10, image_size=(8, 8), batch_size=128,
                         lr=1e-3, epochs=1, steps_per_epoch=steps_per_epoch, max_steps=max_steps, train_size=997,
                         root_dir=tmp_path, accelerator="cpu",
                         extras={"exclude_perturbations": tuple(exclude)} if exclude else {})


def test_paired_difference_and_t_interval():
    ref = {0: {"clean": 0.9}, 1: {"clean": 0.8}, 2: {"clean": 0.7}}
    other = {0: {"clean": 0.8}, 1: {"clean": 0.6}, 2: {"clean": 0.4}}
    diff = paired(ref, other)["clean"]
    assert diff["mean"] == pytest.approx(0.2) and diff["values"] == pytest.approx([0.1, 0.2, 0.3])
    half = 4.303 * 0.1 / 3**0.5
    assert diff["ci95"] == pytest.approx([0.2 - half, 0.2 + half])


def test_per_seed_metrics_and_family_score():
    result = {"clean": 0.9, "test": {"mean_corrupted": 0.6, "worst_corruption": {"name": "fog", "acc": 0.3},
                                     "per_corruption": {"fog": [0.2, 0.4], "jpeg": [0.8, 1.0]}}}
    assert per_seed_metrics(result) == pytest.approx({"clean": 0.9, "test_mean": 0.6, "test_worst": 0.3,
                                                      "test/fog": 0.3, "test/jpeg": 0.9})
    assert family_score(result["test"], ["fog", "jpeg"]) == pytest.approx(0.6)


def test_bank_names_leave_a_family_out(tmp_path):
    assert methods_module.bank_names(_ctx(tmp_path)) is None
    names = methods_module.bank_names(_ctx(tmp_path, exclude=("gaussian_blur", "motion_blur")))
    assert names is not None and "gaussian_blur" not in names and "rotation" in names


def test_lightning_synth_row_is_the_library_defaults(tmp_path):
    # The README quick start: the datamodule's default generator and sampler, MixingChains' default floor.
    method = build_method("lightning_synth", "robustness")
    ctx = _ctx(tmp_path)
    dm = method.wrap_datamodule(DigitsDataModule(batch_size=128), ctx)
    (generator,) = dm.generators
    default = TargetedAugmentation()
    assert isinstance(generator, TargetedAugmentation)
    assert (generator.class_bias, generator.uniform_floor, generator.min_share, generator.temperature) == (
        default.class_bias, default.uniform_floor, default.min_share, default.temperature)
    default_mix = inspect.signature(SyntheticDataModule).parameters["sampler_uniform_mix"].default
    assert dm.engine.controller.settings.sampler_uniform_mix == default_mix
    share = build_method("uniform_share", "robustness").wrap_datamodule(DigitsDataModule(batch_size=128), ctx)
    assert share.engine.controller.settings.sampler_uniform_mix == 1.0  # the untargeted ablation draws uniformly
    focused = build_method("uniform_share_sampler", "robustness").wrap_datamodule(DigitsDataModule(), ctx)
    assert focused.engine.controller.settings.sampler_uniform_mix == default_mix  # only the profile left out
    assert method.make_module(ctx).consistency.floor == MixingChains().floor


def test_budget_exploration_pairs_differ_only_in_targeting(tmp_path):
    import benchmarks.explore_budget  # noqa: F401  (registers the rows)

    ctx = _ctx(tmp_path)
    for prefix, fraction, weight in (("pool_small", 0.05, 0.1), ("pool_third", 1 / 3, 0.75)):
        made = {}
        for kind in ("targeted", "uniform"):
            method = build_method(f"{prefix}_{kind}", "robustness")
            dm = method.wrap_datamodule(DigitsDataModule(batch_size=128), ctx)
            assert (dm.engine.synthetic_budget, dm.engine.weighting.base_weight) == (fraction, weight)
            assert dm.engine.controller.settings.sampler_uniform_mix == 1.0  # uniform draws in both
            assert method.make_module(ctx).consistency is None
            (made[kind],) = dm.generators
        assert isinstance(made["targeted"], TargetedAugmentation) and made["targeted"].uniform_floor == 0.0
        assert not isinstance(made["uniform"], TargetedAugmentation)


def test_each_run_builds_its_own_analyzer_and_chains(tmp_path):
    """A leave-one-family-out run of a seed gets an analyzer of its own bank, not the main run's (which probes
    the family left out and carries the main run's state); within a run, the chains follow the callback's."""
    method = build_method("lightning_synth", "robustness")
    runs = {}
    for name, ctx in (("main", _ctx(tmp_path)), ("lofo", _ctx(tmp_path, exclude=("gaussian_blur", "motion_blur")))):
        dm = method.wrap_datamodule(DigitsDataModule(batch_size=128), ctx)
        chains = method.make_module(ctx).consistency
        (analyzer,) = [c for c in method.make_callbacks(ctx, dm) if isinstance(c, FailureModeCallback)]
        assert chains.analyzer is analyzer
        runs[name] = analyzer
    assert runs["lofo"] is not runs["main"]
    assert "gaussian_blur" in runs["main"].bank.names and "gaussian_blur" not in runs["lofo"].bank.names


def test_source_variants_pair_samples_with_their_sources(tmp_path):
    ctx = _ctx(tmp_path)
    for name in ("ls_source", "uniform_share_source", "uniform_share_source_sampler"):
        method = build_method(name, "robustness")
        assert method.wrap_datamodule(DigitsDataModule(batch_size=128), ctx).deliver_source
        model = method.make_module(ctx)
        assert model.source_consistency and model.consistency is None
    # the step: cross-entropy on the sources plus the weighted JSD; the per-sample losses are the samples' own
    model = build_method("ls_source", "robustness").make_module(ctx)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    model.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    out = model.training_step((x, y, x.flip(-1)), 0)
    logits, source_logits = model(x), model(x.flip(-1))
    expected = torch.nn.functional.cross_entropy(source_logits, y) + 12.0 * jsd_consistency(source_logits, logits)
    assert float(out["loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert torch.allclose(out["per_sample_loss"], torch.nn.functional.cross_entropy(logits, y, reduction="none"))
    both = build_method("ls_source_chains", "robustness").make_module(ctx)
    assert both.source_consistency and both.consistency.num_views == 1
    both.net = model.net
    views = []
    both.consistency = lambda images: views.append(images) or [images.flip(-2)]
    out = both.training_step((x, y, x.flip(-1)), 0)
    view_logits = model(x.flip(-1).flip(-2))
    expected = (torch.nn.functional.cross_entropy(source_logits, y)
                + 12.0 * jsd_consistency(source_logits, logits, view_logits))
    assert torch.equal(views[0], x.flip(-1)) and float(out["loss"]) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["augmix", "uniform_share", "lightning_synth", "ls_source"])
def test_robustness_methods_train_the_fixed_budget_and_export(name, tmp_path):
    method = build_method(name, "robustness")
    ctx = _ctx(tmp_path / name, exclude=("gaussian_noise",))
    model, stats = run_method(method, ctx, DigitsDataModule(batch_size=128))
    assert stats["steps"] == ctx.max_steps
    if name == "augmix":
        assert isinstance(model.consistency, MixingChains) and "gaussian_noise" not in model.consistency.bank
    path = export_torchscript(model, tmp_path / f"{name}.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.load(str(path))
    assert scripted(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_protocol_arguments_raise():
    from benchmarks import robustness

    for argv, match in ((["--threads", "0"], "threads"), (["--lofo-seeds", "0"], "lofo-seeds"),
                        (["--corruptions", "fog", "--val-corruptions", "fog"], "disjoint")):
        with pytest.raises(ValueError, match=match):
            robustness.parse_args(argv)
    assert robustness.parse_args(["--splits", "val"]).lofo == []  # no test split, no leave-one-family-out
