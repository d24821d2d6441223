"""The networks of :class:`~lightning_synth.generators.gan.ConditionalGAN` and the losses on their outputs.

- Generator: upsample + 3x3 convolutions with conditional batch norm (gains and biases from the class and
  category embeddings), sigmoid output in [0, 1].
- Discriminator: spectrally normalised convolutions; a projection head (class, category and severity)
  gives the realism logit, and an auxiliary head predicts class and category (as in AC-GAN, trained on
  real images only), which keeps samples class-consistent.
- A mode-seeking term (MSGAN) keeps samples of one condition diverse: without it the generator learns to
  ignore its noise and draws one image per class.
- Negative data augmentation (NDA, Sinha et al. 2021): the discriminator also sees junk (uniform noise,
  pixel-shuffled real images, black and flat images) as fake, so that :meth:`ConditionalGAN.realism` rejects junk
  that the generator never happened to draw, and is usable as a quality filter.
- An optional task-adversarial term pushes samples toward what a task model gets wrong, without flipping
  their label.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils.parametrizations import spectral_norm

__all__ = ["make_junk", "margin_hinge", "mode_seeking_loss", "task_adversarial_loss"]


class _ConditionalBatchNorm(nn.Module):
    """Batch norm whose per-channel gain and bias come from the condition vector."""

    def __init__(self, channels: int, condition_dim: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.gain = nn.Linear(condition_dim, channels)
        self.bias = nn.Linear(condition_dim, channels)
        nn.init.zeros_(self.gain.weight)
        nn.init.zeros_(self.gain.bias)

    def forward(self, x: Tensor, condition: Tensor) -> Tensor:
        gain, bias = 1 + self.gain(condition), self.bias(condition)
        return self.norm(x) * gain[:, :, None, None] + bias[:, :, None, None]


class _Generator(nn.Module):
    """``(z, class, category, severity code)`` -> image in [0, 1]: two 2x upsamplings, each followed by a
    3x3 convolution (no checkerboard artefacts of strided transposed convolutions), with the condition
    fed both to the input and to class-conditional batch norms."""

    def __init__(
        self, latent_dim: int, num_classes: int, num_categories: int, image_size: int, channels: int, width: int,
        num_slices: int = 0,
    ) -> None:
        super().__init__()
        self.image_size, self.start, self.width = image_size, math.ceil(image_size / 4), width
        self.class_embed = nn.Embedding(num_classes, latent_dim)
        self.category_embed = nn.Embedding(num_categories, latent_dim)
        self.severity_embed = nn.Embedding(num_categories, latent_dim)
        self.slice_embed = nn.Embedding(num_slices, latent_dim) if num_slices > 0 else None
        condition_dim = (3 if num_slices > 0 else 2) * latent_dim
        self.project = nn.Linear(latent_dim + condition_dim, 2 * width * self.start**2)
        self.norm1 = _ConditionalBatchNorm(2 * width, condition_dim)
        self.conv1 = nn.Conv2d(2 * width, width, 3, 1, 1)
        self.norm2 = _ConditionalBatchNorm(width, condition_dim)
        self.conv2 = nn.Conv2d(width, channels, 3, 1, 1)

    def forward(self, z: Tensor, classes: Tensor, categories: Tensor, codes: Tensor, slices: Tensor) -> Tensor:
        category = self.category_embed(categories) + codes[:, None] * self.severity_embed(categories)
        parts = [self.class_embed(classes), category]
        if self.slice_embed is not None:
            parts.append(self.slice_embed(slices))
        condition = torch.cat(parts, 1)
        h = self.project(torch.cat([z, condition], 1)).view(-1, 2 * self.width, self.start, self.start)
        h = self.conv1(F.interpolate(F.relu(self.norm1(h, condition)), scale_factor=2.0))
        out = self.conv2(F.interpolate(F.relu(self.norm2(h, condition)), scale_factor=2.0))
        off = (out.shape[-1] - self.image_size) // 2  # 4 * ceil(size / 4) may overshoot by up to 3 pixels
        return torch.sigmoid(out[..., off : off + self.image_size, off : off + self.image_size])


class _Discriminator(nn.Module):
    """Projection discriminator: realism logit ``(B,)`` and auxiliary class+category logits.

    The last feature map is flattened into a linear layer rather than averaged over positions: an average
    is a bag of local patches, and a blank image is made of nothing but realistic background patches.
    """

    def __init__(
        self, num_classes: int, num_categories: int, image_size: int, channels: int, width: int, num_slices: int = 0
    ) -> None:
        super().__init__()
        dim = 4 * width
        side = (image_size // 2) // 2  # after two stride-2 4x4 convolutions with padding 1
        self.features = nn.Sequential(
            spectral_norm(nn.Conv2d(channels, width, 4, 2, 1)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(width, 2 * width, 4, 2, 1)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(2 * width, dim, 3, 1, 1)), nn.LeakyReLU(0.2), nn.Flatten(),
            spectral_norm(nn.Linear(dim * side * side, dim)), nn.LeakyReLU(0.2),
        )
        self.realness = spectral_norm(nn.Linear(dim, 1))
        self.class_embed = spectral_norm(nn.Embedding(num_classes, dim))
        self.category_embed = spectral_norm(nn.Embedding(num_categories, dim))
        self.severity_embed = spectral_norm(nn.Embedding(num_categories, dim))
        self.slice_embed = spectral_norm(nn.Embedding(num_slices, dim)) if num_slices > 0 else None
        self.aux = nn.Linear(dim, num_classes + num_categories + num_slices)

    def forward(
        self, images: Tensor, classes: Tensor, categories: Tensor, codes: Tensor, slices: Tensor
    ) -> tuple[Tensor, Tensor]:
        h = self.features(images * 2 - 1)
        projection = (
            self.class_embed(classes) + self.category_embed(categories)
            + codes[:, None] * self.severity_embed(categories)
        )
        if self.slice_embed is not None:
            projection = projection + self.slice_embed(slices)
        return self.realness(h).squeeze(1) + (projection * h).sum(1), self.aux(h)


def mode_seeking_loss(images: Tensor, z: Tensor) -> Tensor:
    """Mode-seeking term (MSGAN, Mao et al. 2019) for pairs ``(i, i + ceil(N / 2))`` made under the same
    conditions: ``1 / (image distance / noise distance)``. Minimising it stops a conditional generator from
    ignoring its noise (one image per class).
    """
    half = (len(z) + 1) // 2
    m = len(z) - half
    image_gap = (images[:m] - images[half : half + m]).abs().mean()
    z_gap = (z[:m] - z[half : half + m]).abs().mean()
    return 1.0 / (image_gap / z_gap.clamp(min=1e-8) + 1e-5) if m > 0 else images.sum() * 0.0


def make_junk(images: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` junk images like ``images`` ``(B, C, H, W)``, in turn: uniform noise, a real image with its pixels
    shuffled, a black (empty) image and a flat image of random brightness. At most ``B`` (the images to
    shuffle)."""
    n = min(n, len(images))
    kind = (torch.arange(n) % 4).view(-1, 1, 1, 1)
    noise = torch.rand((n, *images.shape[1:]), generator=generator)
    order = torch.argsort(torch.rand(n, images[0].numel(), generator=generator), dim=1)
    shuffled = torch.gather(images[:n].flatten(1).cpu(), 1, order).view_as(noise)
    flat = torch.rand(n, 1, 1, 1, generator=generator).expand_as(noise) * (kind == 3)  # black when kind == 2
    junk = torch.where(kind == 0, noise, torch.where(kind == 1, shuffled, flat))
    return junk.to(images.device, images.dtype)


def margin_hinge(logits: Tensor, targets: Tensor, floor: float) -> Tensor:
    """Mean of ``relu(margin - floor)``, with ``margin = logit[target] - max other logit``.

    Minimising it lowers the task model's margin on the target class but stops at ``floor >= 0``, so the
    prediction is pushed toward the decision boundary without crossing it.
    """
    true = logits.gather(1, targets[:, None]).squeeze(1)
    other = logits.scatter(1, targets[:, None], float("-inf")).amax(1)
    return F.relu(true - other - floor).mean()


def task_adversarial_loss(model: nn.Module, fake: Tensor, labels: Tensor, margin: float) -> Tensor:
    """:func:`margin_hinge` of the task ``model`` on the samples ``fake``: gradients reach the samples, never the
    model's parameters (its weights are detached, and it runs in eval mode)."""
    device = next((p.device for p in model.parameters()), fake.device)
    params = {name: p.detach() for name, p in model.named_parameters()}
    params.update(dict(model.named_buffers()))
    with _eval_mode(model):
        logits = functional_call(model, params, (fake.to(device),))
    return margin_hinge(logits, labels.to(device), margin).to(fake.device)


class _eval_mode:  # lower case: used like `torch.no_grad`
    """Put a module in eval mode for a block, then restore its previous mode."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.was_training = module, module.training

    def __enter__(self) -> None:
        self.module.eval()

    def __exit__(self, *exc: object) -> None:
        self.module.train(self.was_training)
