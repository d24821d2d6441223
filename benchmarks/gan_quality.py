# python -m benchmarks.gan_quality --task cells       (the worst-group slice GAN, per (class, colour) cell)
# python -m benchmarks.gan_quality --task categories  (600 GAN steps on CPU; --help for options)
"""How good are `ConditionalGAN` samples?

``--task cells`` (default): the GAN of the worst-group benchmark's ``lightning_synth`` (conditioned on class
and group, fitted on the held-out split, as there), judged per (class, colour) cell: the rate at which a
classifier trained on real images with random colours assigns the cell's samples to their class, beside its
accuracy on real test images of the cell; the rate at which the samples show the cell's colour (nearest
palette colour of the mean tint); and the discriminator's realism AUC of real test images of the cell vs the
cell's samples (0.5: alike to it; 1: always told apart). Writes ``results/gan_quality_cells.json`` and
``results/gan_quality_cells.png`` (rows: classes, columns: colours, a 2x2 block of samples per cell).

``--task categories``: class consistency per weakness category, and realism AUC, as before:

1. Trains a small CNN classifier on real, clean Fashion-MNIST.
2. Trains a `ConditionalGAN` on the same Fashion-MNIST subset with `Trainer.fit` (CPU); with
   `--adversarial-weight` > 0 the classifier is its task model.
3. Trains a second small CNN to tell which category (clean or which perturbation) a real image shows.
4. For every category samples the GAN for every class at the middle severity and reports the rate at which
   the classifier assigns the samples to their conditioned class (chance: 10%) and the rate at which the
   category CNN recognises their conditioned category (chance: 1 / number of categories), each beside the
   same figure on real test images with that perturbation: what a perfect generator would score.
5. Scores real test images and junk with the discriminator's `realism` and reports the ROC AUC of real vs
   each kind of junk (1.0: junk always scored lower): uniform noise, pixel-shuffled real images and blank
   images (kinds the discriminator is trained to reject); jigsaw-shuffled 4x4 patches, smooth noise and
   blends of two images (kinds it never saw); and GAN samples (0.5: real and generated look alike to it).

Writes benchmarks/results/gan_quality.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_synth.datasets import load_fashion_mnist
from lightning_synth.generators.gan import CLEAN, ConditionalGAN

RESULTS = Path(__file__).resolve().parent / "results" / "gan_quality.json"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="GAN training steps (batches)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=16, help="GAN base width (the class default is 32)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--train-size", type=int, default=12000, help="real images the GAN and classifier see")
    parser.add_argument("--per-class", type=int, default=50, help="GAN samples per class and category")
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--classifier-epochs", type=int, default=2)
    parser.add_argument("--adversarial-weight", type=float, default=0.0,
                        help="task-adversarial term against the classifier (lowers its margin on GAN samples)")
    parser.add_argument("--adversarial-margin", type=float, default=3.0, help="margin the adversarial term stops at")
    parser.add_argument("--seed", type=int, default=0)
    # One thread: on a shared 2-core machine, two intra-op threads per process run several times slower.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: by task, in results/)")
    parser.add_argument("--task", choices=("cells", "categories"), default="cells")
    parser.add_argument("--per-cell", type=int, default=20, help="cells task: GAN samples per (class, colour) cell")
    parser.add_argument("--heldout-size", type=int, default=2000, help="cells task: the GAN's group-labelled data")
    parser.add_argument("--gan-slice", choices=("group", "colour"), default="group",
                        help="cells task: the attribute the GAN is conditioned on besides the class")
    args = parser.parse_args()
    if args.out is None:
        args.out = RESULTS if args.task == "categories" else RESULTS.with_name("gan_quality_cells.json")
    return args


def train_gan(
    args: argparse.Namespace, images: Tensor, labels: Tensor, classifier: nn.Module
) -> tuple[ConditionalGAN, float]:
    gan = ConditionalGAN(
        latent_dim=64, num_classes=10, width=args.width, lr=args.lr,
        adversarial_weight=args.adversarial_weight, adversarial_margin=args.adversarial_margin,
    )
    gan.set_task_model(classifier)  # only used when --adversarial-weight > 0
    loader = DataLoader(TensorDataset(images, labels), batch_size=args.batch_size, shuffle=True, drop_last=True)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2 * args.steps,  # manual optimization: two optimizer steps per batch
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(gan, loader)
    return gan.eval(), time.perf_counter() - start


def small_cnn(outputs: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, outputs),
    )


def train_classifier(args: argparse.Namespace, images: Tensor, labels: Tensor) -> tuple[nn.Module, float]:
    """The judge of class consistency: a small CNN trained on real, clean images."""
    return fit_cnn(small_cnn(), images, labels, args.classifier_epochs)


def train_category_classifier(args: argparse.Namespace, gan: ConditionalGAN, images: Tensor) -> tuple[nn.Module, float]:
    """The judge of category fidelity: a CNN that tells which perturbation (or none) a real image shows,
    trained on real images perturbed the way the GAN's discriminator saw them."""
    g = torch.Generator().manual_seed(args.seed + 3)
    parts = [gan.perturb_randomly(x, g) for x in images.split(1000)]
    perturbed, categories = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return fit_cnn(small_cnn(len(gan.categories)), perturbed, categories, args.classifier_epochs)


def fit_cnn(model: nn.Module, images: Tensor, labels: Tensor, epochs: int) -> tuple[nn.Module, float]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    for _ in range(epochs):
        for x, y in DataLoader(TensorDataset(images, labels), batch_size=128, shuffle=True):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval(), time.perf_counter() - start


@torch.no_grad()
def mean_margin(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    """Mean of ``logit[label] - max other logit``: how confidently right (> 0) or wrong (< 0) the model is."""
    logits = torch.cat([model(x) for x in images.split(1000)])
    true = logits.gather(1, labels[:, None]).squeeze(1)
    return float((true - logits.scatter(1, labels[:, None], float("-inf")).amax(1)).mean())


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    preds = torch.cat([model(x).argmax(1) for x in images.split(1000)])
    return float((preds == labels).float().mean())


def auc(positive: Tensor, negative: Tensor) -> float:
    """ROC AUC: the chance that a random positive scores above a random negative (ties count half)."""
    diff = positive[:, None] - negative[None, :]
    return float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())


def category_rates(args: argparse.Namespace, gan: ConditionalGAN, classifier: nn.Module, judge: nn.Module,
                   test_x: Tensor, test_y: Tensor) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(args.seed + 1)
    classes = torch.arange(10).repeat_interleave(args.per_class)
    rows = []
    for k, name in enumerate(gan.categories):
        categories = torch.full_like(classes, k)
        severity = None if name == CLEAN else (1 + gan.max_severity(k)) / 2
        samples = gan.sample(classes, categories, generator=g, severities=severity)
        real = test_x if severity is None else gan.bank[name](test_x, severity, generator=g)
        rows.append({
            "category": name,
            "severity": severity if severity is not None else 0.0,
            "gan_class_rate": accuracy(classifier, samples, classes),
            "gan_classifier_margin": mean_margin(classifier, samples, classes),
            "real_class_accuracy": accuracy(classifier, real, test_y),
            "gan_category_rate": accuracy(judge, samples, categories),
            "real_category_accuracy": accuracy(judge, real, torch.full_like(test_y, k)),
            "gan_realism": float(gan.realism(samples, classes, categories, severity).mean()),
        })
    return rows


SEEN_JUNK = ("uniform_noise", "shuffled_pixels", "blank")  # kinds of `make_junk` (blank: a flat image)


def realism_aucs(args: argparse.Namespace, gan: ConditionalGAN, test_x: Tensor, test_y: Tensor) -> dict[str, float]:
    g = torch.Generator().manual_seed(args.seed + 2)
    clean = torch.full_like(test_y, gan.clean_index)
    n, side = len(test_x), test_x.shape[-1] // 4
    patches = test_x.unfold(2, 4, 4).unfold(3, 4, 4).reshape(n, side * side, 16)  # 4x4 patches
    jigsaw = patches[:, torch.randperm(side * side, generator=g)].view(n, side, side, 4, 4)
    junk = {
        "uniform_noise": torch.rand(test_x.shape, generator=g),
        "shuffled_pixels": test_x.flatten(1)[:, torch.randperm(test_x[0].numel(), generator=g)].view_as(test_x),
        "blank": torch.zeros_like(test_x),
        # Kinds the discriminator never saw as junk:
        "jigsaw_4x4": jigsaw.permute(0, 1, 3, 2, 4).reshape(test_x.shape),
        "smooth_noise": F.interpolate(torch.rand(n, 1, 7, 7, generator=g), size=test_x.shape[-2:], mode="bilinear"),
        "blend_of_two": (test_x + test_x.roll(1, 0)) / 2,  # two garments superimposed
        "gan_samples": gan.sample(test_y, clean, generator=g),
    }
    real = gan.realism(test_x, test_y, clean)
    return {name: auc(real, gan.realism(x, test_y, clean)) for name, x in junk.items()}


def colour_of(images: Tensor) -> Tensor:
    """Nearest palette colour ``(N,)`` of each tinted image's mean tint (pixels of any brightness)."""
    from benchmarks.worst_group import PALETTE

    rgb = images.sum((2, 3))
    rgb = rgb / rgb.amax(1, keepdim=True).clamp_min(1e-8)
    return ((rgb[:, None, :] - PALETTE[None]) ** 2).sum(2).argmin(1)


def save_cell_grid(path: Path, samples: Tensor, num_classes: int, num_colours: int, per: int = 4) -> None:
    """One PNG: rows are classes, columns colours, each cell a ``sqrt(per)`` square of its first samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = int(per**0.5)
    c, h, w = samples.shape[1:]
    cell_h, cell_w = side * h + 2, side * w + 2
    canvas = torch.ones(c, num_classes * cell_h, num_colours * cell_w)
    cells = samples.view(num_classes, num_colours, -1, c, h, w)
    for y in range(num_classes):
        for k in range(num_colours):
            for i in range(side * side):
                r, q = divmod(i, side)
                top, left = y * cell_h + r * h, k * cell_w + q * w
                canvas[:, top : top + h, left : left + w] = cells[y, k, i]
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, canvas.permute(1, 2, 0).clamp(0, 1).numpy())


def main_cells(args: argparse.Namespace) -> None:
    from benchmarks.common import write_json
    from benchmarks.worst_group import LAYOUT, ColouredFashionMNISTDataModule, make_slice_gan, sample_colours, tint

    dm = ColouredFashionMNISTDataModule(val_size=2000, heldout_size=args.heldout_size, train_size=args.train_size,
                                        seed=args.seed)
    dm.setup("fit")
    assert dm.test_set is not None and dm.train_set is not None
    gan, gan_seconds = make_slice_gan(dm, args.seed, args.steps, args.width, batch_size=args.batch_size,
                                      slice_key=args.gan_slice)
    # The judge: real images (the training split's shapes) with colours independent of the class.
    g = torch.Generator().manual_seed(args.seed + 5)
    judge_x = tint(dm.train_set.grey, sample_colours(dm.train_set.labels, None, g))
    judge = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
    )
    judge, judge_seconds = fit_cnn(judge, judge_x, dm.train_set.labels, args.classifier_epochs)
    test = dm.test_set
    test_x, test_groups = test.images(), test.groups
    groups = torch.arange(LAYOUT.num_groups).repeat_interleave(args.per_cell)
    classes = LAYOUT.split(groups)[0]
    clean = torch.zeros_like(classes)
    gan_slices = groups if args.gan_slice == "group" else LAYOUT.split(groups)[1]
    samples = gan.sample(classes, clean, generator=torch.Generator().manual_seed(args.seed + 1), slices=gan_slices)
    with torch.no_grad():
        judged = torch.cat([judge(x).argmax(1) for x in samples.split(1000)])
        judged_real = torch.cat([judge(x).argmax(1) for x in test_x.split(1000)])
    fake_score = gan.realism(samples, classes, clean, slices=gan_slices)
    real_classes = test.labels
    real_slices = test_groups if args.gan_slice == "group" else test.colours
    real_score = gan.realism(test_x, real_classes, torch.zeros_like(real_classes), slices=real_slices)
    sample_colour, real_colour = colour_of(samples), colour_of(test_x)
    cells = []
    for group in range(LAYOUT.num_groups):
        fake, real = groups == group, test_groups == group
        y, k = LAYOUT.split(torch.tensor(group))
        cells.append({
            "cell": LAYOUT.name(group),
            "train_share": float((dm.train_set.groups == group).float().mean()),
            "gan_class_rate": float((judged[fake] == y).float().mean()),
            "real_class_accuracy": float((judged_real[real] == y).float().mean()) if real.any() else None,
            "gan_colour_rate": float((sample_colour[fake] == k).float().mean()),
            "real_colour_rate": float((real_colour[real] == k).float().mean()) if real.any() else None,
            "realism_auc_real_vs_gan": auc(real_score[real], fake_score[fake]) if real.any() else None,
        })

    def mean(key: str, rows: list[dict[str, Any]]) -> float:
        values = [r[key] for r in rows if r[key] is not None]
        return sum(values) / len(values)

    minority = [r for r, group in zip(cells, range(LAYOUT.num_groups)) if group // 10 != group % 10]
    summary = {key: {"all_cells": mean(key, cells), "minority_cells": mean(key, minority)}
               for key in ("gan_class_rate", "real_class_accuracy", "gan_colour_rate", "real_colour_rate",
                           "realism_auc_real_vs_gan")}
    png = args.out.with_suffix(".png")
    save_cell_grid(png, samples, LAYOUT.num_classes, LAYOUT.num_colours, per=min(4, args.per_cell))
    result = {
        "command": "python -m benchmarks.gan_quality " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "seconds": {"gan_training": round(gan_seconds, 1), "judge_training": round(judge_seconds, 1)},
        "judge_test_accuracy": float((judged_real == real_classes).float().mean()),
        "summary": summary,
        "cells": cells,
        "grid": png.name,
    }
    write_json(args.out, result)
    print(f"GAN: {args.steps} steps in {gan_seconds:.0f} s; "
          f"judge accuracy on real test {result['judge_test_accuracy']:.3f}")
    print(f"{'':<24} {'all cells':>10} {'minority cells':>15}")
    for key, value in summary.items():
        print(f"{key:<24} {value['all_cells']:>10.3f} {value['minority_cells']:>15.3f}")
    print(f"wrote {args.out} and {png}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, verbose=False)
    if args.task == "cells":
        main_cells(args)
        return
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    pick = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(args.seed))[: args.train_size]
    train_x, train_y = train_x[pick], train_y[pick]
    test_x, test_y = test_x[: args.test_size], test_y[: args.test_size]

    classifier, classifier_seconds = train_classifier(args, train_x, train_y)
    gan, gan_seconds = train_gan(args, train_x, train_y, classifier)
    judge, judge_seconds = train_category_classifier(args, gan, train_x)
    rows = category_rates(args, gan, classifier, judge, test_x, test_y)
    aucs = realism_aucs(args, gan, test_x, test_y)
    result = {
        "command": "python benchmarks/gan_quality.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "seconds": {"gan_training": round(gan_seconds, 1), "classifier_training": round(classifier_seconds, 1),
                    "category_classifier_training": round(judge_seconds, 1),
                    "per_gan_step": round(gan_seconds / args.steps, 3)},
        "classifier_clean_accuracy": accuracy(classifier, test_x, test_y),
        "chance_rate": 0.1,
        "categories": rows,
        "mean_gan_class_rate": sum(r["gan_class_rate"] for r in rows) / len(rows),
        "mean_gan_category_rate": sum(r["gan_category_rate"] for r in rows) / len(rows),
        "mean_gan_classifier_margin": sum(r["gan_classifier_margin"] for r in rows) / len(rows),
        "realism_auc_real_vs": aucs,
        "junk_kinds_seen_by_discriminator": list(SEEN_JUNK),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"\nwrote {args.out}")


def print_table(result: dict[str, Any]) -> None:
    print(f"\nGAN trained {result['config']['steps']} steps in {result['seconds']['gan_training']} s; "
          f"classifier clean accuracy {result['classifier_clean_accuracy']:.3f}; chance 0.100")
    print(f"{'':<16} {'':>4}   {'class judged right':^19}   {'category judged right':^22}")
    print(f"{'category':<16} {'sev':>4}   {'GAN':>8} {'real':>8}   {'GAN':>8} {'real':>8}   {'realism':>8}")
    for r in result["categories"]:
        print(f"{r['category']:<16} {r['severity']:>4.1f}   {r['gan_class_rate']:>8.3f} "
              f"{r['real_class_accuracy']:>8.3f}   {r['gan_category_rate']:>8.3f} "
              f"{r['real_category_accuracy']:>8.3f}   {r['gan_realism']:>8.3f}")
    print(f"{'mean':<16} {'':>4}   {result['mean_gan_class_rate']:>8.3f} {'':>8}   "
          f"{result['mean_gan_category_rate']:>8.3f}")
    print(f"mean classifier margin on GAN samples: {result['mean_gan_classifier_margin']:.2f} "
          f"(adversarial_weight={result['config']['adversarial_weight']}, "
          f"adversarial_margin={result['config']['adversarial_margin']})")
    print("\nrealism AUC, real test images vs:")
    for name, value in result["realism_auc_real_vs"].items():
        note = " (a kind of junk the discriminator trains on)" if name in SEEN_JUNK else ""
        print(f"  {name:<16} {value:.3f}{note}")


if __name__ == "__main__":
    main()
