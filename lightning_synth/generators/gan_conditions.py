"""The conditions of :class:`~lightning_synth.generators.gan.ConditionalGAN` and the checks of its arguments:
the category names, and the class, category, slice and image tensors a caller passes."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

from lightning_synth.perturbations import registered_perturbations

__all__ = ["CLEAN", "check_conditions", "check_images", "check_slices", "check_training_weights"]

CLEAN = "clean"
"""The category of unperturbed images."""


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"Tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    return f"{type(value).__name__}: {value!r}"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_float(name: str, value: object, minimum: float, inclusive: bool = True) -> None:
    if not _is_number(value):
        raise TypeError(f"`{name}` must be a float, got {_describe(value)}")
    assert isinstance(value, (int, float))
    if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
        rule = ">=" if inclusive else ">"
        raise ValueError(f"`{name}` must be finite and {rule} {minimum}, got {value}")


def _check_categories(categories: object) -> list[str]:
    if isinstance(categories, str) or not isinstance(categories, Sequence):
        raise TypeError(f"`categories` must be a list of names, got {_describe(categories)}")
    names = list(categories)
    if not all(isinstance(c, str) for c in names):
        raise TypeError(f"`categories` must hold strings, got {names!r}")
    if CLEAN not in names:
        raise ValueError(f"`categories` must include {CLEAN!r}, got {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"`categories` must not repeat a name, got {names}")
    unknown = [c for c in names if c != CLEAN and c not in registered_perturbations()]
    if unknown:
        raise ValueError(
            f"`categories` has unknown perturbations {unknown}; use {CLEAN!r} or registered ones: "
            f"{registered_perturbations()}"
        )
    return names


def check_conditions(classes: object, categories: object, num_classes: int, num_categories: int) -> None:
    """Raise unless ``classes`` and ``categories`` are 1-D integer tensors of one length, within range."""
    for name, value, limit in (("classes", classes, num_classes), ("categories", categories, num_categories)):
        if not isinstance(value, Tensor) or value.ndim != 1 or value.is_floating_point():
            raise TypeError(f"`{name}` must be a 1-D integer tensor, got {_describe(value)}")
        if len(value) and (int(value.min()) < 0 or int(value.max()) >= limit):
            raise ValueError(f"`{name}` must be in [0, {limit}), got values in "
                             f"[{int(value.min())}, {int(value.max())}]")
    assert isinstance(classes, Tensor) and isinstance(categories, Tensor)
    if len(classes) != len(categories):
        raise ValueError(f"`classes` and `categories` must have the same length, got "
                         f"{len(classes)} and {len(categories)}")


def check_slices(slices: object, n: int, num_slices: int) -> None:
    """Raise unless ``slices`` is a 1-D integer tensor of length ``n`` with values in ``[0, max(num_slices, 1))``."""
    if not isinstance(slices, Tensor) or slices.ndim != 1 or slices.is_floating_point() or len(slices) != n:
        raise TypeError(f"`slices` must be a 1-D integer tensor of length {n}, got {_describe(slices)}")
    limit = max(num_slices, 1)
    if len(slices) and (int(slices.min()) < 0 or int(slices.max()) >= limit):
        raise ValueError(f"`slices` must be in [0, {limit}), got values in [{int(slices.min())}, "
                         f"{int(slices.max())}]")


def check_images(images: object, n: int, channels: int, size: int) -> None:
    """Raise unless ``images`` is a tensor of shape ``(n, channels, size, size)``.

    Example:
        >>> import torch
        >>> check_images(torch.zeros(2, 1, 8, 8), 2, channels=1, size=8)  # fits: no error
        >>> try:
        ...     check_images(torch.zeros(2, 3, 8, 8), 2, channels=1, size=8)
        ... except ValueError as error:
        ...     print(str(error).split(" with")[0])
        This GAN takes images of shape (N, 1, 8, 8)
    """
    if not isinstance(images, Tensor) or tuple(images.shape) != (n, channels, size, size):
        raise ValueError(
            f"This GAN takes images of shape (N, {channels}, {size}, {size}) with N = {n} labels, got "
            f"{_describe(images)}; set `image_size`/`channels` to match the data."
        )


def check_training_weights(
    lr: object, betas: object, aux_weight: object, diversity_weight: object, junk_fraction: object,
    adversarial_weight: object, adversarial_margin: object,
) -> None:
    """Raise unless the optimiser settings and loss weights of a :class:`ConditionalGAN` are in range."""
    _check_float("lr", lr, 0.0, inclusive=False)
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_is_number(b) for b in betas)):
        raise TypeError(f"`betas` must be a pair of floats, got {betas!r}")
    if not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"`betas` must both be in [0, 1), got {tuple(betas)}")
    _check_float("aux_weight", aux_weight, 0.0)
    _check_float("diversity_weight", diversity_weight, 0.0)
    _check_float("junk_fraction", junk_fraction, 0.0)
    _check_float("adversarial_weight", adversarial_weight, 0.0)
    _check_float("adversarial_margin", adversarial_margin, 0.0)
