"""Tests of `ConditionalGAN` (gan.py) and `ConditionalGANGenerator` (gan_generator.py) on 8x8 digits."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor, nn

from lightning_synth.datasets import DigitsDataModule, load_digits_tensors
from lightning_synth.generators.base import GenerationContext
from lightning_synth.generators.gan import ConditionalGAN, make_junk, margin_hinge, mode_seeking_loss
from lightning_synth.generators.gan_generator import ConditionalGANGenerator
from lightning_synth.profile import Weakness, WeaknessKind, WeaknessProfile

TINY: dict[str, Any] = {"latent_dim": 8, "image_size": 8, "width": 8}


def tiny_gan(**kwargs: Any) -> ConditionalGAN:
    torch.manual_seed(0)
    return ConditionalGAN(**{**TINY, **kwargs})


@pytest.fixture(scope="module")
def digits() -> tuple[Tensor, Tensor]:
    return load_digits_tensors()


@pytest.fixture(scope="module")
def trained_gan(digits: tuple[Tensor, Tensor]) -> ConditionalGAN:
    gan = tiny_gan(categories=["clean", "rotation", "gaussian_noise"])
    gan.fit_steps(*digits, steps=40, batch_size=64, generator=torch.Generator().manual_seed(0))
    return gan


def context(digits: tuple[Tensor, Tensor], seed: int = 0, **kwargs: Any) -> GenerationContext:
    return GenerationContext(digits[0][:256], digits[1][:256], 10, torch.Generator().manual_seed(seed), **kwargs)


def weakness(kind: WeaknessKind, name: str, gap: float, **kwargs: Any) -> Weakness:
    return Weakness(kind=kind, name=name, error_rate=min(gap + 0.1, 1.0), gap=gap, support=50, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"latent_dim": 0}, ValueError, "`latent_dim` must be >= 1"),
        ({"latent_dim": 8.0}, TypeError, "`latent_dim` must be an int"),
        ({"num_classes": 1}, ValueError, "`num_classes` must be >= 2"),
        ({"image_size": 3}, ValueError, "`image_size` must be >= 4"),
        ({"channels": 0}, ValueError, "`channels` must be >= 1"),
        ({"width": True}, TypeError, "`width` must be an int"),
        ({"categories": "clean"}, TypeError, "`categories` must be a list"),
        ({"categories": ["clean", 3]}, TypeError, "`categories` must hold strings"),
        ({"categories": ["rotation"]}, ValueError, "`categories` must include 'clean'"),
        ({"categories": ["clean", "rotation", "rotation"]}, ValueError, "must not repeat"),
        ({"categories": ["clean", "sepia"]}, ValueError, r"unknown perturbations \['sepia'\]"),
        ({"lr": 0.0}, ValueError, "`lr` must be finite and > 0"),
        ({"lr": "fast"}, TypeError, "`lr` must be a float"),
        ({"betas": (0.5,)}, TypeError, "`betas` must be a pair"),
        ({"betas": (0.5, 1.0)}, ValueError, r"`betas` must both be in \[0, 1\)"),
        ({"aux_weight": -1.0}, ValueError, "`aux_weight` must be finite and >= 0"),
        ({"diversity_weight": -0.1}, ValueError, "`diversity_weight` must be finite and >= 0"),
        ({"junk_fraction": None}, TypeError, "`junk_fraction` must be a float"),
        ({"adversarial_weight": float("nan")}, ValueError, "`adversarial_weight` must be finite"),
        ({"adversarial_margin": -0.5}, ValueError, "`adversarial_margin` must be finite and >= 0"),
        ({"batch_adapter": 3}, TypeError, "`batch_adapter` must be"),
        ({"num_slices": -1}, ValueError, "`num_slices` must be >= 0"),
        ({"slice_key": ""}, TypeError, "`slice_key` must be a non-empty string"),
    ],
)
def test_bad_gan_arguments_raise(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ConditionalGAN(**{**TINY, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"gan": nn.Linear(2, 2)}, TypeError, "`gan` must be a ConditionalGAN"),
        ({"min_quality": 1.5}, ValueError, r"`min_quality` must be in \[0, 1\], got 1.5"),
        ({"min_quality": float("nan")}, ValueError, r"`min_quality` must be in \[0, 1\]"),
        ({"min_quality": "high"}, TypeError, "`min_quality` must be a float"),
        ({"oversample": 0.5}, ValueError, r"`oversample` must be in \[1, 1e\+06\]"),
        ({"max_rounds": 0}, ValueError, "`max_rounds` must be >= 1"),
        ({"train_steps": -1}, ValueError, "`train_steps` must be >= 0"),
        ({"batch_size": 2.0}, TypeError, "`batch_size` must be an int"),
        ({"class_check": "judge"}, ValueError, "`class_check` must be one of"),
    ],
)
def test_bad_generator_arguments_raise(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    kwargs = {"gan": tiny_gan(), **kwargs}
    with pytest.raises(error, match=match):
        ConditionalGANGenerator(**kwargs)


def test_bad_runtime_inputs_raise(digits: tuple[Tensor, Tensor]) -> None:
    gan = tiny_gan()
    with pytest.raises(TypeError, match="`classes` must be a 1-D integer tensor"):
        gan.sample(torch.zeros(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`categories` must be in \[0, 10\)"):
        gan.sample(torch.zeros(2, dtype=torch.long), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="same length"):
        gan.sample(torch.zeros(2, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`severities` must be in \[0, max severity"):
        gan.sample(torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.long), severities=6.0)
    with pytest.raises(ValueError, match=r"images of shape \(N, 1, 8, 8\)"):
        gan.realism(torch.rand(2, 1, 28, 28), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(KeyError, match="No category 'sepia'"):
        gan.category_index("sepia")
    with pytest.raises(TypeError, match=r"`model` must be a torch\.nn\.Module"):
        gan.set_task_model(lambda x: x)  # type: ignore[arg-type]
    generator = ConditionalGANGenerator(gan)
    with pytest.raises(ValueError, match="`budget` must be >= 0"):
        generator.generate(WeaknessProfile(), -1, context(digits))
    wrong = GenerationContext(digits[0][:8], digits[1][:8] % 5, 5, torch.Generator())
    with pytest.raises(ValueError, match="`num_classes=10`"):
        generator.generate(WeaknessProfile(), 4, wrong)


def test_trainer_fit_runs_and_checkpoint_restores(tmp_path: Path) -> None:
    L.seed_everything(0)
    gan = tiny_gan()
    before = copy.deepcopy(gan.state_dict())
    trainer = L.Trainer(
        accelerator="cpu", max_steps=8, enable_progress_bar=False, enable_model_summary=False, logger=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(gan, datamodule=DigitsDataModule(batch_size=32))
    assert {"gan/loss_d", "gan/loss_g"} <= set(trainer.callback_metrics)
    assert not torch.equal(before["generator.project.weight"], gan.state_dict()["generator.project.weight"])
    trainer.save_checkpoint(tmp_path / "gan.ckpt")
    restored = ConditionalGAN.load_from_checkpoint(tmp_path / "gan.ckpt")
    classes, categories = torch.arange(10), torch.arange(10)
    assert torch.equal(gan.sample(classes, categories, torch.Generator().manual_seed(1)),
                       restored.sample(classes, categories, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize(("image_size", "channels"), [(8, 1), (28, 1), (10, 3)])
def test_sample_shape_range_and_determinism(image_size: int, channels: int) -> None:
    gan = tiny_gan(image_size=image_size, channels=channels, categories=["clean", "contrast"])
    classes, categories = torch.tensor([0, 3, 9]), torch.tensor([0, 1, 1])
    images = gan.sample(classes, categories, torch.Generator().manual_seed(0), severities=torch.tensor([0, 1, 5.0]))
    assert images.shape == (3, channels, image_size, image_size)
    assert images.min() >= 0 and images.max() <= 1
    again = gan.sample(classes, categories, torch.Generator().manual_seed(0), severities=torch.tensor([0, 1, 5.0]))
    assert torch.equal(images, again)
    scores = gan.realism(images, classes, categories)
    assert scores.shape == (3,) and bool(((scores >= 0) & (scores <= 1)).all())
    assert gan.training  # sample/realism restore the mode they found


def test_fit_steps_is_deterministic_given_the_generator(digits: tuple[Tensor, Tensor]) -> None:
    a = tiny_gan(categories=["clean", "rotation", "occlusion"])
    b = copy.deepcopy(a)
    for gan in (a, b):
        gan.fit_steps(*digits, steps=3, batch_size=16, generator=torch.Generator().manual_seed(7))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_realism_ranks_real_above_noise(trained_gan: ConditionalGAN, digits: tuple[Tensor, Tensor]) -> None:
    real, labels = digits[0][:200], digits[1][:200]
    clean = torch.zeros(200, dtype=torch.long)
    real_scores = trained_gan.realism(real, labels, clean)
    noise_scores = trained_gan.realism(torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
                                       labels, clean)
    auc = (real_scores[:, None] > noise_scores[None, :]).float().mean()
    assert auc > 0.9, f"realism AUC of real vs noise is {auc:.3f}"


def test_adversarial_term_reaches_samples_not_the_task_model(digits: tuple[Tensor, Tensor]) -> None:
    task = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    task.train()
    gan = tiny_gan(adversarial_weight=1.0, adversarial_margin=0.0)
    gan.set_task_model(task)
    assert "_task_model" not in dict(gan.named_modules()) and not any("task" in k for k in gan.state_dict())
    fake = gan.sample(torch.arange(4), torch.zeros(4, dtype=torch.long)).requires_grad_(True)
    loss = gan._adversarial_loss(fake, torch.arange(4))
    loss.backward()
    assert fake.grad is not None and all(p.grad is None for p in task.parameters())
    assert task.training
    opts = gan.fit_steps(*digits, steps=1, batch_size=8, generator=torch.Generator().manual_seed(0))
    assert len(opts) == 2


def test_margin_hinge_stops_at_the_floor() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.5, 0.0, 0.2]])
    assert margin_hinge(logits, torch.tensor([0, 0]), floor=1.0).item() == pytest.approx((1.0 + 0.0) / 2)
    assert margin_hinge(logits, torch.tensor([1, 2]), floor=0.0).item() == 0.0  # already wrong: no push


def test_mode_seeking_loss_punishes_identical_pairs() -> None:
    z = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    same = torch.rand(4, 1, 8, 8).repeat(2, 1, 1, 1)
    assert mode_seeking_loss(same, z) > 1e4
    assert mode_seeking_loss(torch.rand(8, 1, 8, 8), z) < 10
    assert mode_seeking_loss(torch.rand(1, 1, 8, 8), z[:1]) == 0  # no pair: no term


def test_make_junk_is_noise_shuffled_black_and_flat_images(digits: tuple[Tensor, Tensor]) -> None:
    images = digits[0][:10]
    junk = make_junk(images, 6, torch.Generator().manual_seed(0))
    assert junk.shape == (6, 1, 8, 8) and junk.min() >= 0 and junk.max() <= 1
    assert torch.equal(junk, make_junk(images, 6, torch.Generator().manual_seed(0)))
    assert torch.equal(junk[1].flatten().sort().values, images[1].flatten().sort().values)  # shuffled pixels
    assert junk[0].std() > 0.1 and junk[2].max() == 0 and junk[3].unique().numel() == 1  # noise, black, flat
    assert len(make_junk(images, 50)) == 10 and len(make_junk(images, 0)) == 0


def test_perturb_randomly_shows_what_the_discriminator_sees(digits: tuple[Tensor, Tensor]) -> None:
    gan = tiny_gan(categories=["clean", "occlusion", "brightness"])
    images = digits[0][:64]
    out, categories, severities = gan.perturb_randomly(images, torch.Generator().manual_seed(0))
    clean = categories == gan.clean_index
    assert out.shape == images.shape and set(categories.tolist()) == {0, 1, 2}
    assert torch.equal(out[clean], images[clean]) and bool((severities[clean] == 0).all())
    assert not torch.equal(out[~clean], images[~clean])
    assert bool(((severities[~clean] >= 1) & (severities[~clean] <= 5)).all())
    again = gan.perturb_randomly(images, torch.Generator().manual_seed(0))[0]
    assert torch.equal(out, again)


def test_generator_follows_the_profile(trained_gan: ConditionalGAN, digits: tuple[Tensor, Tensor]) -> None:
    generator = ConditionalGANGenerator(trained_gan)
    profile = WeaknessProfile(weaknesses=[
        weakness("class", "6", 0.4, target=6),
        weakness("confusion", "3->5", 0.1, target=3, other=5),
        weakness("class", "1", -0.1, target=1),  # better than clean: never targeted
        weakness("slice", "group=2", 0.5, target=2),  # the GAN cannot make slices
    ])
    batch = generator.generate(profile, 200, context(digits))
    assert len(batch) == 200 and batch.generator == "gan" and batch.inputs.shape == (200, 1, 8, 8)
    counts = torch.bincount(batch.targets, minlength=10)
    assert counts[6] > 120 and counts[3] > 15 and counts.sum() == counts[6] + counts[3]
    assert set(batch.weakness) == {"class/6", "confusion/3->5"}
    assert all(k == ("class/6" if t == 6 else "confusion/3->5") for k, t in zip(batch.weakness, batch.targets))

    rotated = WeaknessProfile(weaknesses=[weakness("perturbation", "rotation", 0.3, severity=3.0),
                                          weakness("perturbation", "motion_blur", 0.6, severity=2.0)])
    batch = generator.generate(rotated, 50, context(digits))
    assert set(batch.weakness) == {"perturbation/rotation@3"}  # motion_blur is not one of this GAN's categories
    assert len(set(batch.targets.tolist())) > 5  # classes drawn uniformly

    batch = generator.generate(WeaknessProfile(), 30, context(digits))
    assert batch.weakness == [f"class/{t}" for t in batch.targets.tolist()]
    assert len(generator.generate(profile, 0, context(digits))) == 0


def test_generator_output_is_identical_for_identical_contexts(trained_gan: ConditionalGAN,
                                                              digits: tuple[Tensor, Tensor]) -> None:
    profile = WeaknessProfile(weaknesses=[weakness("perturbation", "gaussian_noise", 0.3, severity=2.0)])
    rank0 = ConditionalGANGenerator(copy.deepcopy(trained_gan), train_steps=2, batch_size=16)
    rank1 = ConditionalGANGenerator(copy.deepcopy(trained_gan), train_steps=2, batch_size=16)
    a, b = (g.generate(profile, 20, context(digits, seed=3)) for g in (rank0, rank1))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.quality, b.quality) and a.weakness == b.weakness


def test_quality_filter_drops_junk(trained_gan: ConditionalGAN, digits: tuple[Tensor, Tensor],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    gan = copy.deepcopy(trained_gan)

    def junk_for_odd_classes(images: Tensor, classes: Tensor, categories: Tensor, severities: Any = None,
                             slices: Any = None) -> Tensor:
        return torch.where(classes % 2 == 1, 0.1, 0.9)

    monkeypatch.setattr(gan, "realism", junk_for_odd_classes)
    batch = ConditionalGANGenerator(gan, min_quality=0.5).generate(WeaknessProfile(), 64, context(digits))
    assert len(batch) == 64  # oversampled until the budget was met
    assert bool((batch.targets % 2 == 0).all()) and bool((batch.quality >= 0.5).all())
    starved = ConditionalGANGenerator(gan, min_quality=0.95, max_rounds=2).generate(
        WeaknessProfile(), 16, context(digits))
    assert len(starved) == 0


def test_state_round_trip_gives_the_same_gan(trained_gan: ConditionalGAN, digits: tuple[Tensor, Tensor]) -> None:
    profile = WeaknessProfile(weaknesses=[weakness("class", "4", 0.2, target=4)])
    original = ConditionalGANGenerator(copy.deepcopy(trained_gan), train_steps=2, batch_size=16)
    original.generate(profile, 8, context(digits, seed=1))  # trains: weights and Adam state move on
    state = copy.deepcopy(original.state_dict())
    assert len(state["optimizers"]) == 2 and state["optimizers"][0]["state"]

    resumed = ConditionalGANGenerator(tiny_gan(categories=trained_gan.categories), train_steps=2, batch_size=16)
    resumed.load_state_dict(state)
    a, b = (g.generate(profile, 8, context(digits, seed=2)) for g in (original, resumed))
    assert torch.equal(a.inputs, b.inputs)  # same weights and same Adam state through two more steps
    assert json.dumps(sorted(state)) == json.dumps(["gan", "optimizers", "train_calls"])


_DDP_SCRIPT = """
import json, sys
import lightning as L
import torch
from lightning_synth.datasets import DigitsDataModule
from lightning_synth.generators.gan import ConditionalGAN

L.seed_everything(0)
gan = ConditionalGAN(latent_dim=8, image_size=8, width=8)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy=sys.argv[1], max_steps=4, logger=False,
                    enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                    default_root_dir=sys.argv[2])
trainer.fit(gan, datamodule=DigitsDataModule(batch_size=32))
total = sum(float(p.double().sum()) for p in gan.parameters())
with open(f"{sys.argv[2]}/rank{trainer.global_rank}.json", "w") as fh:
    json.dump({"total": total}, fh)
torch.distributed.destroy_process_group()  # gloo's threads otherwise can abort the interpreter's exit
"""


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("strategy", ["ddp", "ddp_find_unused_parameters_true"])
def test_ddp_ranks_end_identical(tmp_path: Path, strategy: str) -> None:
    script = tmp_path / "fit_gan.py"
    script.write_text(textwrap.dedent(_DDP_SCRIPT))
    run = subprocess.run([sys.executable, str(script), strategy, str(tmp_path)], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr[-3000:]
    totals = [json.loads((tmp_path / f"rank{r}.json").read_text())["total"] for r in (0, 1)]
    assert totals[0] == totals[1]
