"""Held-out image corruptions for the robustness benchmark, in the style of ImageNet-C.

Deliberately written apart from :mod:`lightning_synth.perturbations`: a method that trains on the
library's bank (rotation, translation, scale, gaussian/motion blur, gaussian noise, occlusion, contrast,
brightness) must be scored on shifts it never saw, or the benchmark would only measure memorisation of
the bank. Each corruption has five severities and is a pure function of ``(images, severity, generator)``,
so a seed fixes the corrupted test set for every method.

Try it: ``python -m benchmarks.corruptions`` writes ``benchmarks/results/corruptions.png`` (a grid of
every corruption at every severity on Fashion-MNIST test images).

Shape:
    - images: ``(B, C, H, W)`` float in [0, 1], any ``C`` (1 or 3 in the benchmarks)
    - output: same shape, dtype and device, in [0, 1]
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d
from kornia.geometry.transform import elastic_transform2d
from PIL import Image
from torch import Tensor

__all__ = [
    "CORRUPTIONS",
    "LOFO_FAMILIES",
    "NUM_SEVERITIES",
    "TEST_CORRUPTIONS",
    "VALIDATION_CORRUPTIONS",
    "Corruption",
    "corrupt",
]

NUM_SEVERITIES = 5
Corruption = Callable[[Tensor, int, torch.Generator], Tensor]
"""``fn(images, severity in 1..5, generator) -> images``; randomness only from ``generator`` (CPU)."""


def _rand(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    # Drawn on CPU so a seed gives the same corruption on every device.
    return torch.rand(shape, generator=generator).to(device=like.device, dtype=like.dtype)


def _randn(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    return torch.randn(shape, generator=generator).to(device=like.device, dtype=like.dtype)


def _plasma(batch: int, size: int, decay: float, generator: torch.Generator) -> Tensor:
    """Diamond-square fractal noise ``(batch, size, size)`` in [0, 1]; ``size`` a power of two.

    Lower ``decay`` keeps more high-frequency detail (patchier fog).
    """
    grid = torch.zeros(batch, size, size)
    step, wibble = size, 100.0

    def jitter(total: Tensor) -> Tensor:
        return total / 4 + wibble * (2 * torch.rand(total.shape, generator=generator) - 1)

    while step >= 2:
        half = step // 2
        corners = grid[:, ::step, ::step]
        square = corners + corners.roll(-1, dims=1)
        square = square + square.roll(-1, dims=2)
        grid[:, half::step, half::step] = jitter(square)
        centres, corners = grid[:, half::step, half::step], grid[:, ::step, ::step]
        grid[:, ::step, half::step] = jitter(centres + centres.roll(1, 1) + corners + corners.roll(-1, 2))
        grid[:, half::step, ::step] = jitter(centres + centres.roll(1, 2) + corners + corners.roll(-1, 1))
        step, wibble = half, wibble / decay
    flat = grid.flatten(1)
    low, high = flat.amin(1)[:, None, None], flat.amax(1)[:, None, None]
    return (grid - low) / (high - low).clamp_min(1e-8)


def fog(images: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Adds a per-image plasma-fractal haze, then rescales (ImageNet-C's fog)."""
    strength, decay = [(0.4, 2.6), (0.7, 2.3), (1.0, 2.0), (1.4, 1.8), (1.9, 1.6)][severity - 1]
    b, _, h, w = images.shape
    size = 2 ** math.ceil(math.log2(max(h, w, 2)))
    haze = _plasma(b, size, decay, generator)[:, None, :h, :w].to(images)
    peak = images.flatten(1).amax(1).view(b, 1, 1, 1)
    return ((images + strength * haze) * peak / (peak + strength)).clamp(0, 1)


def pixelate(images: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Box-downsamples to a fraction of the size, then upsamples with nearest neighbour."""
    factor = [0.8, 0.6, 0.45, 0.35, 0.25][severity - 1]
    h, w = images.shape[-2:]
    small = F.interpolate(images, size=(max(1, round(h * factor)), max(1, round(w * factor))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


def jpeg(images: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """A real JPEG round trip at low quality (Pillow, per image on CPU; 1 or 3 channels)."""
    quality = [25, 18, 15, 10, 7][severity - 1]
    channels = images.shape[1]
    if channels not in (1, 3):
        raise ValueError(f"`jpeg` needs 1 or 3 channels, got {channels}")
    pixels = images.detach().mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    decoded = []
    for image in pixels:
        buffer = io.BytesIO()
        pil = Image.fromarray(image[..., 0] if channels == 1 else image)
        pil.save(buffer, format="JPEG", quality=quality)
        decoded.append(np.asarray(Image.open(buffer)).reshape(image.shape))
    out = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2)
    return out.to(device=images.device, dtype=images.dtype).div(255)


def elastic(images: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Smooth random displacement field (kornia's elastic transform); alpha grows with severity."""
    alpha = [0.7, 1.1, 1.5, 2.0, 2.5][severity - 1]
    b, _, h, w = images.shape
    noise = 2 * _rand((b, 2, h, w), generator, images) - 1
    out = elastic_transform2d(images, noise, kernel_size=(19, 19), sigma=(3.0, 3.0), alpha=(alpha, alpha))
    return out.clamp(0, 1)


def impulse_noise(images: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Salt-and-pepper: a fraction of values set to 0 or 1, half each."""
    amount = [0.03, 0.06, 0.09, 0.17, 0.27][severity - 1]
    draw = _rand(tuple(images.shape), generator, images)
    salt, pepper = draw < amount / 2, (draw >= amount / 2) & (draw < amount)
    return images.masked_fill(salt, 1.0).masked_fill(pepper, 0.0)


def zoom_blur(images: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Average of the image and centre zooms of it up to a factor: a radial blur."""
    top, step = [(1.11, 0.01), (1.16, 0.01), (1.21, 0.02), (1.26, 0.02), (1.31, 0.03)][severity - 1]
    zooms = torch.arange(1.0, top, step)[1:]
    b = len(images)
    theta = torch.zeros(len(zooms), 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / zooms
    theta = theta.repeat_interleave(b, 0).to(images)
    stacked = images.repeat(len(zooms), 1, 1, 1)
    grid = F.affine_grid(theta, list(stacked.shape), align_corners=False)
    zoomed = F.grid_sample(stacked, grid, mode="bilinear", padding_mode="border", align_corners=False)
    total = images + zoomed.view(len(zooms), *images.shape).sum(0)
    return (total / (len(zooms) + 1)).clamp(0, 1)


def speckle_noise(images: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Multiplicative Gaussian noise ``x + x * N(0, s)``: it scales with brightness, unlike additive noise."""
    scale = [0.15, 0.25, 0.35, 0.45, 0.6][severity - 1]
    return (images + images * scale * _randn(tuple(images.shape), generator, images)).clamp(0, 1)


def spatter(images: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Mud-coloured blobs: smoothed noise above a per-image quantile; coverage grows with severity."""
    coverage = [0.06, 0.1, 0.15, 0.21, 0.28][severity - 1]
    b, c, h, w = images.shape
    layer = gaussian_blur2d(_randn((b, 1, h, w), generator, images), (7, 7), (1.2, 1.2))
    threshold = layer.flatten(1).quantile(1 - coverage, dim=1).view(b, 1, 1, 1)
    mask = torch.sigmoid((layer - threshold) * 40.0)
    mud = torch.tensor([0.45, 0.33, 0.2], device=images.device, dtype=images.dtype)
    colour = mud.view(1, 3, 1, 1) if c == 3 else mud.mean()
    return (images * (1 - mask) + colour * mask).clamp(0, 1)


# --------------------------------------------------------------------- validation corruptions
# Used only to choose configurations (scored on the validation split); disjoint from the test corruptions.
def shot_noise(images: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Poisson (photon) noise: ``Poisson(x * rate) / rate``; fewer photons is noisier."""
    rate = [60.0, 25.0, 12.0, 5.0, 3.0][severity - 1]
    counts = torch.poisson((images * rate).cpu(), generator=generator).to(images)
    return (counts / rate).clamp(0, 1)


def defocus_blur(images: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Convolution with a disk (an out-of-focus lens), radius growing with severity."""
    radius = [1.0, 1.5, 2.0, 2.5, 3.0][severity - 1]
    size = 2 * math.ceil(radius) + 1
    axis = torch.arange(size, dtype=images.dtype, device=images.device) - size // 2
    disk = ((axis[:, None] ** 2 + axis[None, :] ** 2) <= radius**2).to(images.dtype)
    kernel = (disk / disk.sum()).expand(images.shape[1], 1, size, size)
    padded = F.pad(images, [size // 2] * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=images.shape[1]).clamp(0, 1)


def glass_blur(images: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Frosted glass: every pixel takes a random neighbour's value within a radius, then a light blur."""
    shift, sigma = [(1, 0.4), (1, 0.6), (2, 0.5), (2, 0.7), (3, 0.7)][severity - 1]
    b, c, h, w = images.shape
    dy = torch.randint(-shift, shift + 1, (b, h, w), generator=generator)
    dx = torch.randint(-shift, shift + 1, (b, h, w), generator=generator)
    rows = (torch.arange(h)[None, :, None] + dy).clamp(0, h - 1)
    cols = (torch.arange(w)[None, None, :] + dx).clamp(0, w - 1)
    flat = (rows * w + cols).view(b, 1, h * w).expand(b, c, h * w).to(images.device)
    out = images.flatten(2).gather(2, flat).view(b, c, h, w)
    return gaussian_blur2d(out, (5, 5), (sigma, sigma)).clamp(0, 1)


def gamma(images: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """A non-linear intensity curve ``x ** g`` (g > 1 darkens mid-tones): a tone shift, not a linear one."""
    g = [1.6, 2.2, 2.8, 3.5, 4.5][severity - 1]
    return images.clamp(0, 1).pow(g)


def shear(images: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """A random horizontal or vertical shear of the whole image."""
    amount = [0.15, 0.25, 0.35, 0.45, 0.6][severity - 1]
    b = len(images)
    sign = torch.randint(0, 2, (b,), generator=generator).float() * 2 - 1
    vertical = torch.rand(b, generator=generator) < 0.5
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 1] = torch.where(vertical, 0.0, amount * sign)
    theta[:, 1, 0] = torch.where(vertical, amount * sign, 0.0)
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0, 1)


TEST_CORRUPTIONS: tuple[str, ...] = (
    "fog", "pixelate", "jpeg", "elastic", "impulse_noise", "zoom_blur", "speckle_noise", "spatter",
)
"""The held-out test corruptions (scored on the test split); never used to choose a configuration."""
VALIDATION_CORRUPTIONS: tuple[str, ...] = ("shot_noise", "defocus_blur", "glass_blur", "gamma", "shear")
"""Corruptions for choosing configurations (scored on the validation split); disjoint from the test ones."""
LOFO_FAMILIES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "noise": (("gaussian_noise",), ("impulse_noise", "speckle_noise")),
    "blur": (("gaussian_blur", "motion_blur"), ("zoom_blur",)),
    "contrast": (("contrast", "brightness"), ("fog",)),
    "occlusion": (("occlusion",), ("spatter",)),
    "geometry": (("rotation", "translation", "scale"), ("elastic",)),
}
"""Leave-one-family-out: family -> (bank perturbations removed from training, its closest test corruptions)."""


CORRUPTIONS: dict[str, Corruption] = {
    "fog": fog,
    "pixelate": pixelate,
    "jpeg": jpeg,
    "elastic": elastic,
    "impulse_noise": impulse_noise,
    "zoom_blur": zoom_blur,
    "speckle_noise": speckle_noise,
    "spatter": spatter,
    "shot_noise": shot_noise,
    "defocus_blur": defocus_blur,
    "glass_blur": glass_blur,
    "gamma": gamma,
    "shear": shear,
}


def corrupt(images: Tensor, name: str, severity: int, seed: int = 0) -> Tensor:
    """Apply corruption ``name`` at ``severity`` (1..5); the same seed gives the same output.

    Args:
        images: float ``(B, C, H, W)`` in [0, 1].
        name: a key of :data:`CORRUPTIONS`.
        severity: integer level, 1 (mild) to 5 (severe).
        seed: seed of the corruption's randomness (noise, fractal, displacement field).

    Returns:
        The corrupted images: same shape, dtype and device, values in [0, 1].

    Raises:
        ValueError: if ``name`` is unknown, ``severity`` is outside 1..5 or ``images`` is not 4-D.
        TypeError: if ``images`` is not a floating tensor or ``severity``/``seed`` is not an int.

    Example:
        >>> images = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        >>> out = corrupt(images, "fog", severity=3, seed=1)
        >>> tuple(out.shape), bool(out.min() >= 0 and out.max() <= 1)
        ((2, 1, 28, 28), True)
        >>> torch.equal(out, corrupt(images, "fog", severity=3, seed=1))
        True
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"`name` must be one of {sorted(CORRUPTIONS)}, got {name!r}")
    if isinstance(severity, bool) or not isinstance(severity, int):
        raise TypeError(f"`severity` must be an int in 1..{NUM_SEVERITIES}, got {type(severity).__name__}")
    if not 1 <= severity <= NUM_SEVERITIES:
        raise ValueError(f"`severity` must be in 1..{NUM_SEVERITIES}, got {severity}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed` must be an int, got {type(seed).__name__}: {seed!r}")
    if not isinstance(images, Tensor) or not images.is_floating_point():
        raise TypeError(f"`images` must be a floating-point tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"`images` must be (B, C, H, W), got shape {tuple(images.shape)}")
    if len(images) == 0:
        return images.clone()
    return CORRUPTIONS[name](images, severity, torch.Generator().manual_seed(seed))


def _save_grid(path: Path, count: int = 3) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_synth.datasets import load_fashion_mnist

    images = load_fashion_mnist("test")[0][:count]
    rows, cols = len(CORRUPTIONS), NUM_SEVERITIES + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.0 * cols, 1.0 * count * rows))
    for row, name in enumerate(CORRUPTIONS):
        columns = [images] + [corrupt(images, name, s, seed=0) for s in range(1, NUM_SEVERITIES + 1)]
        for col, batch in enumerate(columns):
            axes[row, col].imshow(torch.cat(list(batch[:, 0]), 0).numpy(), cmap="gray", vmin=0, vmax=1)
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
        axes[row, 0].set_ylabel(name, fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "results" / "corruptions.png"
    _save_grid(out)
    print(f"wrote {out}")
