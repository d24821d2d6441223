import json
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

# `benchmarks` is not an installed package: make the repository root importable under plain `pytest` too.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks import robustness, worst_group  # noqa: E402
from benchmarks.common import (  # noqa: E402
    Classifier,
    KorniaPolicy,
    Method,
    MethodContext,
    UniformPerturbation,
    budget,
    build_method,
    classifier_factory,
    export_torchscript,
    method_names,
    register_method,
    run_method,
)
from benchmarks.worst_group import (  # noqa: E402
    LAYOUT,
    ColouredFashionMNISTDataModule,
    GroupDROLoss,
    make_jtt,
    recolour,
    sample_colours,
    tint,
)
from lightning_synth.batch import BatchView  # noqa: E402
from lightning_synth.datasets import DigitsDataModule  # noqa: E402

# A few hundred samples, 1 epoch, 1 seed, a narrow network: the smoke runs check wiring, not accuracy.
TINY = [
    "--seeds",
    "0",
    "--epochs",
    "1",
    "--train-size",
    "256",
    "--val-size",
    "128",
    "--batch-size",
    "64",
    "--width",
    "8",
    "--accelerator",
    "cpu",
]


def test_bad_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="`in_channels` must be an int >= 1, got 0"):
        Classifier(in_channels=0)
    with pytest.raises(ValueError, match="`num_classes` must be >= 2, got 1"):
        Classifier(num_classes=1)
    with pytest.raises(ValueError, match="`lr` must be > 0, got 0"):
        Classifier(lr=0)
    with pytest.raises(TypeError, match="`batch_transform` must be callable or None, got int"):
        Classifier(batch_transform=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`name` must be a non-empty string"):
        Method("")
    with pytest.raises(ValueError, match="`tasks` must be a non-empty tuple drawn from"):
        Method("x", tasks=("segmentation",))
    with pytest.raises(TypeError, match="`make_callbacks` must be callable"):
        Method("x", make_callbacks=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"must not set the shared step budget, got keys \['max_steps'\]"):
        Method("x", trainer_kwargs={"max_steps": 5})
    with pytest.raises(ValueError, match="`name` must be a registered method"):
        build_method("nope")
    with pytest.raises(ValueError, match="runs in tasks"):
        build_method("trivialaugment", "worst_group")
    with pytest.raises(ValueError, match="`task` must be one of"):
        method_names("nope")
    with pytest.raises(ValueError, match="'erm' is already registered"):
        register_method(Method("erm"))
    with pytest.raises(TypeError, match="`method` must be a Method"):
        register_method("erm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`chunk_size` must be >= 1, got 0"):
        KorniaPolicy(torch.nn.Identity(), chunk_size=0)
    with pytest.raises(ValueError, match="`bank` must have a non-empty `names`"):
        UniformPerturbation(bank=object())
    with pytest.raises(ValueError, match="`max_severity` must be >= 1"):
        UniformPerturbation(bank=_FakeBank(), max_severity=0)
    with pytest.raises(ValueError, match="`num_groups` must be >= 1"):
        GroupDROLoss(0)
    with pytest.raises(ValueError, match="`step_size` must be > 0"):
        GroupDROLoss(4, step_size=0)
    with pytest.raises(ValueError, match="`identify_epochs` and `upweight` must be >= 1"):
        make_jtt(identify_epochs=0)
    with pytest.raises(ValueError, match="`train_agreement` must be in"):
        ColouredFashionMNISTDataModule(train_agreement=1.5)
    with pytest.raises(ValueError, match="`--epochs` must be >= 1, got 0"):
        robustness.parse_args(["--epochs", "0", "--plugins"])
    with pytest.raises(ValueError, match="`--width` must be >= 1, got 0"):
        robustness.parse_args(["--width", "0", "--plugins"])
    with pytest.raises(ValueError, match="`--seeds` must be distinct"):
        robustness.parse_args(["--seeds", "1", "1", "--plugins"])
    with pytest.raises(ValueError, match="`--methods` must not repeat"):
        worst_group.parse_args(["--methods", "erm", "erm", "--plugins"])
    with pytest.raises(ValueError, match="`--train-agreement` must be in"):
        worst_group.parse_args(["--train-agreement", "2", "--plugins"])
    with pytest.raises(ModuleNotFoundError):
        robustness.parse_args(["--plugins", "benchmarks.no_such_plugin"])
    with pytest.raises(ValueError, match=r"`--lofo-methods` must name methods that train on the bank .*\['erm'\]"):
        robustness.parse_args(["--lofo-methods", "augmix", "erm", "--plugins"])


class _FakeBank:
    names = ("plus", "minus")

    def __init__(self):
        self.calls = []

    def __getitem__(self, name):
        def apply(images, severity, generator=None):
            self.calls.append((name, severity.clone()))
            return images + (0.01 if name == "plus" else -0.01) * severity.view(-1, 1, 1, 1)

        return apply


def test_uniform_perturbation_gives_each_sample_one_op_and_level():
    bank = _FakeBank()
    images = torch.full((64, 1, 4, 4), 0.5)
    out = UniformPerturbation(bank)(images)
    levels = ((out - 0.5) / 0.01).round()[:, 0, 0, 0]
    assert {abs(int(v)) for v in levels} <= {1, 2, 3, 4, 5} and (levels > 0).any() and (levels < 0).any()
    assert sum(len(severity) for _, severity in bank.calls) == 64
    assert torch.equal(images, torch.full((64, 1, 4, 4), 0.5))


def test_uniform_perturbation_with_the_library_bank():
    pytest.importorskip("lightning_synth.perturbations")
    out = UniformPerturbation()(torch.rand(16, 1, 28, 28))
    assert out.shape == (16, 1, 28, 28) and out.min() >= 0 and out.max() <= 1


def test_kornia_policies_keep_grey_shape_and_range():
    from kornia.augmentation.auto import RandAugment, TrivialAugment

    for policy in (TrivialAugment(), RandAugment(n=2, m=9)):
        out = KorniaPolicy(policy, chunk_size=4)(torch.rand(10, 1, 28, 28))
        assert out.shape == (10, 1, 28, 28) and out.min() >= 0 and out.max() <= 1


def test_group_dro_moves_weight_to_the_worst_group():
    dro = GroupDROLoss(num_groups=3, step_size=0.5)
    view = BatchView(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), {"group": torch.tensor([0, 0, 1, 2])})
    for _ in range(5):
        dro(torch.tensor([0.1, 0.1, 2.0, 0.5]), view)
    assert dro.q.argmax() == 1 and torch.isclose(dro.q.sum(), torch.tensor(1.0))
    assert "q" in dro.state_dict()
    with pytest.raises(RuntimeError, match=r"needs training batches \(x, y, group\)"):
        dro(torch.ones(2), BatchView(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long)))


def test_recolour_scenario_makes_the_requested_group():
    from lightning_synth.generators.base import GenerationContext

    grey, labels = torch.rand(20, 1, 28, 28), torch.arange(20) % 10
    context = GenerationContext(tint(grey, labels), labels, 10, torch.Generator().manual_seed(0))
    scenario = worst_group.task_extras()["scenarios"]["group"]
    images, targets = scenario(int(LAYOUT.group(torch.tensor(4), torch.tensor(8))), 6, context)
    assert targets.tolist() == [4] * 6 and images.shape == (6, 3, 28, 28)
    assert torch.allclose(images, tint(images.amax(1, keepdim=True), torch.full((6,), 8)))  # white


def test_colours_groups_and_recolour():
    labels = torch.arange(10).repeat(500)
    g = torch.Generator().manual_seed(0)
    agree = (sample_colours(labels, 0.95, g) == labels).float().mean()
    independent = (sample_colours(labels, None, g) == labels).float().mean()
    assert 0.93 < agree < 0.97 and 0.07 < independent < 0.13
    grey = torch.rand(3, 1, 28, 28)
    images = tint(grey, torch.tensor([0, 4, 9]))
    assert torch.allclose(images.amax(1, keepdim=True), grey)
    assert torch.allclose(recolour(images, torch.tensor([2, 2, 2])), tint(grey, torch.tensor([2, 2, 2])))
    labels_back, colours_back = LAYOUT.split(LAYOUT.group(torch.tensor([3]), torch.tensor([7])))
    assert (labels_back.item(), colours_back.item()) == (3, 7) and LAYOUT.name(37) == "Dress/magenta"


class _Recorder(Callback):
    def __init__(self):
        self.batches, self.per_sample = 0, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1
        self.per_sample.append(outputs["per_sample_loss"])


class _Doubled(L.LightningDataModule):
    """A wrapper that doubles the training set, as a synthetic-data datamodule would."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def setup(self, stage=None):
        self.base.setup(stage)

    def train_dataloader(self):
        loader = self.base.train_dataloader()
        dataset: torch.utils.data.Dataset = torch.utils.data.ConcatDataset([loader.dataset, loader.dataset])
        return torch.utils.data.DataLoader(dataset, batch_size=loader.batch_size, shuffle=True)

    def val_dataloader(self):
        return self.base.val_dataloader()


def test_registered_method_hooks_and_fixed_budget(tmp_path):
    recorder = _Recorder()
    seen = {}

    def wrap(dm, ctx):
        seen["ctx"] = ctx
        seen["dm"] = _Doubled(dm)
        return seen["dm"]

    def callbacks(ctx, dm):
        assert dm is seen["dm"]
        return [recorder]

    method = Method(
        "test_doubled",
        make_callbacks=callbacks,
        wrap_datamodule=wrap,
        make_module=classifier_factory(make_transform=lambda ctx: lambda x: x.flip(-1)),
    )
    steps_per_epoch, max_steps = budget(train_size=997, batch_size=256, epochs=1)
    ctx = MethodContext(
        task="robustness",
        seed=0,
        in_channels=1,
        num_classes=10,
        image_size=(8, 8),
        batch_size=256,
        lr=1e-3,
        epochs=1,
        steps_per_epoch=steps_per_epoch,
        max_steps=max_steps,
        train_size=997,
        root_dir=tmp_path,
        accelerator="cpu",
    )
    model, stats = run_method(method, ctx, DigitsDataModule(batch_size=256))
    assert seen["ctx"] is ctx and max_steps == 4
    assert stats["steps"] == max_steps == recorder.batches  # the doubled data did not buy extra steps
    assert recorder.per_sample[0].shape == (256,)
    assert isinstance(model, Classifier) and model.batch_transform is not None
    images = torch.rand(3, 1, 8, 8)
    path = export_torchscript(model, tmp_path / "model.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.load(str(path))
    assert torch.allclose(scripted(images), model.eval()(images), atol=1e-5)


def _check_export(path: Path, channels: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.load(str(path))
    assert not scripted.training
    assert scripted(torch.rand(5, channels, 28, 28)).shape == (5, 10)


@pytest.mark.slow
def test_robustness_main_smoke(tmp_path):
    payload = robustness.main(
        [
            *TINY,
            "--test-size",
            "100",
            "--plugins",
            "--methods",
            "erm",
            "trivialaugment",
            "--results-dir",
            str(tmp_path),
            "--export-dir",
            str(tmp_path / "models"),
        ]
    )
    saved = json.loads((tmp_path / "robustness.json").read_text())
    assert set(saved["summary"]) == {"erm", "trivialaugment"} == set(payload["summary"])
    erm = saved["summary"]["erm"]
    test = erm["test"]
    assert 0 <= test["mean_corrupted"]["mean"] <= 1 and test["worst_corruption"]["name"] in robustness.TEST_CORRUPTIONS
    assert erm["val"]["worst_corruption"]["name"] in robustness.VALIDATION_CORRUPTIONS
    assert len(saved["runs"]["erm"]["0"]["test"]["per_corruption"]["fog"]) == 5
    assert set(saved["paired_differences"]["vs"]) == set()  # the reference (lightning_synth) did not run
    assert saved["config"]["max_steps"] == 4 and saved["runs"]["trivialaugment"]["0"]["steps"] == 4
    assert (tmp_path / "robustness.png").stat().st_size > 0
    for name in ("erm", "trivialaugment"):
        _check_export(tmp_path / "models" / f"{name}.pt", channels=1)
    merged = robustness.main([*TINY, "--test-size", "100", "--plugins", "--methods", "erm", "--merge",
                              str(tmp_path / "robustness.json"), "--results-dir", str(tmp_path / "merged")])
    assert merged["runs"]["erm"] == {0: saved["runs"]["erm"]["0"]}  # read back, nothing is trained again
    [(_, part)] = merged["merged_parts"].items()
    assert part["methods"] == ["erm", "trivialaugment"] and part["commit"] == saved["commit"]


@pytest.mark.slow
def test_exploration_plugins_do_what_they_say(tmp_path):
    """ls_real_last (and, over two epochs, ls_real_second_half) draws no synthetic sample in its last epoch,
    uss_real_only and us_real_only in none; ls_real_views sees real and synthetic rows."""
    payload = robustness.main([*TINY, "--epochs", "2", "--test-size", "100", "--splits", "val", "--plugins",
                               "benchmarks.methods", "benchmarks.explore_schedule", "benchmarks.explore_views",
                               "--methods", "ls_real_last", "ls_real_second_half", "uss_real_only", "us_real_only",
                               "ls_real_views", "ls_synth_views",
                               "--results-dir", str(tmp_path)])
    for name in ("ls_real_last", "ls_real_second_half"):
        masses = payload["runs"][name][0]["info"]["synthetic_mass_by_epoch"]
        assert len(masses) == 2 and masses[0] > 0 and masses[1] == 0
    for name in ("uss_real_only", "us_real_only"):
        assert payload["runs"][name][0]["info"]["synthetic_mass_by_epoch"] == [0, 0]
    from benchmarks.explore_schedule import WeightFromEpoch, variant

    with pytest.raises(ValueError, match=r"`when` must be one of .*, got 'middle'"):
        variant("bad", 0.0, when="middle")

    with pytest.raises(ValueError, match=r"`from_epoch` must be >= 0, got -1"):
        WeightFromEpoch(None, -1, 0.0, {})
    assert 0 < payload["runs"]["ls_real_views"][0]["info"]["real_share"] < 1
    assert payload["runs"]["ls_synth_views"][0]["info"]["real_share"] < 1  # synthetic rows to make views of


@pytest.mark.slow
def test_worst_group_main_smoke(tmp_path):
    worst_group.main(
        [
            *TINY,
            "--test-size",
            "300",
            "--plugins",
            "--methods",
            "erm",
            "jtt",
            "--results-dir",
            str(tmp_path),
            "--export-dir",
            str(tmp_path / "models"),
        ]
    )
    saved = json.loads((tmp_path / "worst_group.json").read_text())
    assert set(saved["summary"]) == {"erm", "jtt"}
    run = saved["runs"]["jtt"]["0"]
    assert run["steps"] == saved["config"]["max_steps"] == 4
    assert run["info"]["jtt_identify_steps"] == 4 and run["info"]["jtt_error_set"] >= 0
    assert 0 <= run["worst_group"] <= run["worst_decile"] <= run["mean_group"] <= 1 and run["groups_evaluated"] > 50
    assert (tmp_path / "worst_group.png").stat().st_size > 0
    _check_export(tmp_path / "models" / "jtt.pt", channels=3)


def test_merge_keeps_only_the_listed_methods_also_in_leave_one_family_out(tmp_path):
    part = {"runs": {"erm": {"0": {"clean": 0.8}}, "augmix": {"0": {"clean": 0.81}}},
            "lofo": {"blur": {"erm": {"per_seed": {"0": 0.7}}, "augmix": {"per_seed": {"0": 0.75}}}}}
    path = tmp_path / "part.json"
    path.write_text(json.dumps(part))
    runs, lofo = robustness.merge_parts([path], ["augmix"])
    assert runs == {"augmix": {0: {"clean": 0.81}}} and lofo == {"blur": {"augmix": {0: 0.75}}}


def test_leave_one_family_out_never_scores_a_bank_method_with_its_main_model(tmp_path):
    # uniform_share_sampler trains on the whole bank: its main model has seen the left-out family, so a part
    # that scored it there (before `uses_bank` knew the name) is dropped; ERM keeps its main-model score
    assert robustness.uses_bank("uniform_share_sampler") and robustness.uses_bank("uniform_share_source")
    assert not robustness.uses_bank("erm") and not robustness.uses_bank("trivialaugment")
    part = {"runs": {n: {"0": {"clean": 0.8}} for n in ("erm", "uniform_share_sampler", "lightning_synth")},
            "lofo": {"blur": {n: {"per_seed": {"0": 0.7}}
                              for n in ("erm", "uniform_share_sampler", "lightning_synth")}}}
    path = tmp_path / "part.json"
    path.write_text(json.dumps(part))
    _, lofo = robustness.merge_parts([path], ["erm", "uniform_share_sampler", "lightning_synth"])
    assert lofo == {"blur": {"erm": {0: 0.7}, "lightning_synth": {0: 0.7}}}
    # asking the merge to keep it does not bring back what that part scored with the main model ...
    names = ["erm", "uniform_share_sampler", "lightning_synth"]
    _, lofo = robustness.merge_parts([path], names, baselines=["uniform_share_sampler"])
    assert lofo == {"blur": {"erm": {0: 0.7}, "lightning_synth": {0: 0.7}}}
    # ... while a part run with `--lofo-methods uniform_share_sampler` (retrained without the family) is kept
    part["config"] = {"lofo_methods": ["uniform_share_sampler"], "reference": "lightning_synth"}
    path.write_text(json.dumps(part))
    _, lofo = robustness.merge_parts([path], names, baselines=["uniform_share_sampler"])
    assert lofo == {"blur": {n: {0: 0.7} for n in names}}
    assert robustness.merge_parts([path], names)[1] == {"blur": {"erm": {0: 0.7}, "lightning_synth": {0: 0.7}}}
