"""The perturbation bank: one vocabulary of named perturbations with severity ladders.

The analyzer probes the model with these perturbations and the generators draw from the same bank, so a
weakness named ``perturbation/rotation@3`` can be produced by name: ``bank.apply("rotation@3", images)``.

Each perturbation follows kornia's template: parameters are sampled apart from their application
(:meth:`Perturbation.sample_params` / :meth:`Perturbation.apply_params`), so a call can be replayed, and
sampling takes a ``torch.Generator`` so results are reproducible. Severities are levels ``1..5`` (like
ImageNet-C); fractional severities interpolate the ladder, and a tensor of severities gives each sample
its own.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

import kornia
import torch
from torch import Tensor

__all__ = [
    "KeyedRandom",
    "Params",
    "Perturbation",
    "PerturbationBank",
    "default_bank",
    "parse_spec",
    "register_perturbation",
    "registered_perturbations",
]

Params = dict[str, Tensor]
_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9_\-]+)@(?P<severity>[0-9]*\.?[0-9]+)$")


class Perturbation(ABC):
    """A named perturbation with a ladder of magnitudes for severity levels ``1..len(ladder)``.

    Subclasses set ``name``, ``unit`` and ``ladder`` and implement :meth:`sample_params` and
    :meth:`apply_params`. Severity 0 is the identity; fractional severities interpolate linearly.

    Shape:
        - images: ``(B, C, H, W)`` float in [0, 1]; output has the same shape, clamped to [0, 1].
    """

    name: str = ""
    unit: str = ""
    ladder: tuple[float, ...] = ()
    #: ``True`` when :meth:`sample_params` draws only through this module's helpers, so it also accepts a
    #: :class:`KeyedRandom` (one vectorised call for a batch of per-sample seeds); user subclasses that call
    #: ``torch.rand(..., generator=...)`` themselves keep ``False`` and are sampled one sample at a time.
    keyed_draws: bool = False

    @property
    def max_severity(self) -> int:
        return len(self.ladder)

    def magnitude(self, severity: float | Tensor) -> Tensor:
        """Physical magnitude (degrees, pixels, sigma, ...) at ``severity``; interpolates the ladder."""
        sev = torch.as_tensor(severity, dtype=torch.float32)
        if bool((sev < 0).any()) or bool((sev > self.max_severity).any()):
            raise ValueError(f"`severity` of {self.name!r} must be in [0, {self.max_severity}], got {severity}")
        points = torch.tensor((0.0, *self.ladder))
        low = sev.floor().long().clamp(max=self.max_severity - 1)
        frac = sev - low
        return points[low] + frac * (points[low + 1] - points[low])

    @abstractmethod
    def sample_params(self, shape: torch.Size, magnitude: Tensor, generator: torch.Generator | None) -> Params:
        """Sample per-sample parameters for a batch of ``shape`` at per-sample ``magnitude`` ``(B,)``."""

    @abstractmethod
    def apply_params(self, images: Tensor, params: Params) -> Tensor:
        """Apply previously sampled parameters (on any device)."""

    def __call__(
        self, images: Tensor, severity: float | Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        _check_images(images)
        mag = self.magnitude(severity).expand(images.shape[0]).clone()
        params = self.sample_params(images.shape, mag, generator)
        return self.apply(images, params)

    def apply(self, images: Tensor, params: Params) -> Tensor:
        """Apply ``params`` after moving them to the images' device; output clamped to [0, 1]."""
        moved = {k: v.to(images.device) for k, v in params.items()}
        return self.apply_params(images, moved).clamp_(0.0, 1.0)

    def sample_params_per_sample(
        self, shape: torch.Size, severity: float, seeds: Sequence[int] | Tensor
    ) -> Params:
        """Parameters for each sample from its own seed: the same sample gets the same perturbation
        whatever batch or rank it lands in (used by the analyzer so DDP matches one process).

        Perturbations with :attr:`keyed_draws` draw for the whole batch in one vectorised call
        (:class:`KeyedRandom`); others fall back to one ``torch.Generator`` per sample.
        """
        seeds = torch.as_tensor(seeds, dtype=torch.int64).reshape(-1)
        if self.keyed_draws:
            mag = self.magnitude(severity).expand(len(seeds)).clone()
            return self.sample_params(torch.Size((len(seeds), *shape[1:])), mag, KeyedRandom(seeds))  # type: ignore[arg-type]
        one = torch.Size((1, *shape[1:]))
        mag = self.magnitude(severity).reshape(1)
        parts = [self.sample_params(one, mag, torch.Generator().manual_seed(int(s))) for s in seeds.tolist()]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, ladder={self.ladder} {self.unit})"


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"Perturbations take float images of shape (B, C, H, W) in [0, 1], got {got}")


_MASK32 = 0xFFFFFFFF


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mixing function ("lowbias32") on int64 tensors holding values in ``[0, 2**32)``."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32  # int64 products wrap; their low 32 bits are exact
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


class KeyedRandom:
    """Counter-based random numbers: draw ``k`` of row ``i`` is a pure function of ``(keys[i], k)``.

    A stand-in for ``torch.Generator`` in the built-in perturbations' :meth:`Perturbation.sample_params`:
    a batch of per-sample seeds gives every sample the same parameters whatever batch, rank or order it is
    drawn in, in one vectorised call (no Python loop per sample).

    Args:
        keys: ``(B,)`` integer seeds, one per sample.

    Example:
        >>> a = KeyedRandom(torch.tensor([7, 8])).uniform()
        >>> b = KeyedRandom(torch.tensor([8])).uniform()
        >>> bool(a[1] == b[0]) and bool(((a >= 0) & (a < 1)).all())
        True
    """

    def __init__(self, keys: Tensor) -> None:
        self.keys = _hash32(torch.as_tensor(keys, dtype=torch.int64).reshape(-1) ^ 0x5BD1E995)
        self._draws = 0

    def __len__(self) -> int:
        return len(self.keys)

    def _bits(self, per_row: int) -> Tensor:
        counters = torch.arange(self._draws, self._draws + per_row, dtype=torch.int64)
        self._draws += per_row
        return _hash32(self.keys[:, None] ^ _hash32(counters * 0x9E3779B1 + 0x632BE5AB)[None, :])

    def uniform(self, *tail: int) -> Tensor:
        """``(B, *tail)`` uniforms in ``(0, 1)`` (float32)."""
        count = math.prod(tail)
        bits = self._bits(count)
        return ((bits >> 8).float() + 0.5).div_(2.0**24).reshape(len(self), *tail)

    def normal(self, *tail: int) -> Tensor:
        """``(B, *tail)`` standard normals (Box-Muller)."""
        u1, u2 = self.uniform(*tail), self.uniform(*tail)
        return (-2.0 * u1.log()).sqrt() * torch.cos(2 * math.pi * u2)


Draws = torch.Generator | KeyedRandom | None


def _uniform(n: int, generator: Draws, low: float = 0.0, high: float = 1.0) -> Tensor:
    if isinstance(generator, KeyedRandom):
        return generator.uniform() * (high - low) + low
    return torch.rand(n, generator=generator) * (high - low) + low


def _sign(n: int, generator: Draws) -> Tensor:
    if isinstance(generator, KeyedRandom):
        return (generator.uniform() >= 0.5).float() * 2 - 1
    return torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1


def _normal(shape: torch.Size, generator: Draws) -> Tensor:
    if isinstance(generator, KeyedRandom):
        return generator.normal(*shape[1:])
    return torch.randn(tuple(shape), generator=generator)


class Rotation(Perturbation):
    name, unit, ladder = "rotation", "deg", (10.0, 20.0, 30.0, 45.0, 60.0)
    keyed_draws = True

    def sample_params(self, shape: torch.Size, magnitude: Tensor, generator: torch.Generator | None) -> Params:
        return {"angle": magnitude * _sign(shape[0], generator)}

    def apply_params(self, images: Tensor, params: Params) -> Tensor:
        return kornia.geometry.transform.rotate(images, params["angle"].to(images.dtype))


class Translation(Perturbation):
    name, unit, ladder = "translation", "fraction of size", (0.06, 0.1, 0.15, 0.2, 0.25)
    keyed_draws = True

    def sample_params(self, shape: torch.Size, magnitude: Tensor, generator: torch.Generator | None) -> Params:
        theta = _uniform(shape[0], generator, 0.0, 2 * math.pi)
        size = torch.tensor([shape[-1], shape[-2]], dtype=torch.float32)
        return {"shift": torch.stack([theta.cos(), theta.sin()], 1) * magnitude[:, None] * size}

    def apply_params(self, images: Tensor, params: Params) -> Tensor:
        return kornia.geometry.transform.translate(images, params["shift"].to(images.dtype))


class Scale(Perturbation):
    name, unit, ladder = "scale", "relative zoom", (0.1, 0.2, 0.3, 0.4, 0.5)
    keyed_draws = True

    def sample_params(self, shape: torch.Size, magnitude: Tensor, generator: torch.Generator | None) -> Params:
        # Zoom in or out; zooming in is capped so the object is not cropped away.
        sign = _sign(shape[0], generator)
        factor = torch.where(sign > 0, 1 + 0.6 * magnitude, 1 - magnitude)
        return {"factor": factor[:, None].expand(-1, 2).contiguous()}

    def apply_params(self, images: Tensor, params: Params) -> Tensor:
        return kornia.geometry.transform.scale(images, params["factor"].to(images.dtype))


class GaussianBlur(Perturbation):
    name, unit, ladder = "gaussian_blur", "sigma (px at 28px)", (0.6, 0.9, 1.2, 1.6, 2.2)
    keyed_draws = True

    def sample_params(self, shape: torch.Size, magnitude: Tensor, generator: torch.Generator | None) -> Params:
        return {"sigma": (magnitude * shape[-1] / 28.0).clamp(min=1e-3)}

    def apply_params(self, images: Tensor, params: Params) -> Tensor:
        sigma = params["sigma"].to(images.dtype)
        size = 2 * math.ceil(3 * float(sigma.max())) + 1
        size = min(size, 2 * (min(images.shape[-2:]) // 2) - 1)
        return kornia.filters.gaussian_blur2d(images, (size, size), sigma[:, None].expand(-1, 2).contiguous())


class MotionBlur(Perturbation):
    name, unit, ladder = "motion_blur", "length (px at 28px)", (2.0, 3.5, 5.0, 7.0, 9.0)
    keyed_draws = True

    def sample_params(self, shape: torch.Size, magnitude: Tensor, generator: torch.Generator | None) -> Params:
        return {
            "length": (magnitude * shape[-1] / 28.0).clamp(min=0.0),
            "angle": _uniform(shape[0], generator, 0.0, math.pi),
        }

    def apply_params(self, images: Tensor, params: Params) -> Tensor:
        length, angle = params["length"].to(images.dtype), params["angle"].to(images.dtype)
        half = math.ceil(float(length.max()) / 2)
        coords = torch.arange(-half, half + 1, device=images.device, dtype=images.dtype)
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")
        cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
        along = xx * cos + yy * sin
        across = (-xx * sin + yy * cos).abs()
        kernel = (1 - across).clamp(min=0) * (along.abs() <= length[:, None, None] / 2).to(images.dtype)
        kernel = kernel / kernel.sum(dim=(-2, -1), keepdim=True).clamp(min=1e-6)
        return kornia.filters.filter2d(images, kernel, border_type="constant")


class GaussianNoise(Perturbation):
    name, unit, ladder = "gaussian_noise", "std", (0.05, 0.1, 0.15, 0.22, 0.3)
    keyed_draws = True

    def sample_params(self, shape: torch.Size, magnitude: Tensor, generator: torch.Generator | None) -> Params:
        return {"noise": _normal(shape, generator) * magnitude.view(-1, 1, 1, 1)}

    def apply_params(self, images: Tensor, params: Params) -> Tensor:
        return images + params["noise"].to(images.dtype)


class Occlusion(Perturbation):
    name, unit, ladder = "occlusion", "area fraction", (0.06, 0.12, 0.18, 0.25, 0.35)
    keyed_draws = True

    def sample_params(self, shape: torch.Size, magnitude: Tensor, generator: torch.Generator | None) -> Params:
        n = shape[0]
        side = magnitude.sqrt()
        centre = torch.stack([_uniform(n, generator, 0.2, 0.8), _uniform(n, generator, 0.2, 0.8)], 1)
        return {"box": torch.cat([centre - side[:, None] / 2, centre + side[:, None] / 2], 1)}

    def apply_params(self, images: Tensor, params: Params) -> Tensor:
        h, w = images.shape[-2:]
        ys = (torch.arange(h, device=images.device, dtype=images.dtype) + 0.5) / h
        xs = (torch.arange(w, device=images.device, dtype=images.dtype) + 0.5) / w
        box = params["box"].to(images.dtype)
        inside_y = (ys[None] >= box[:, 1:2]) & (ys[None] < box[:, 3:4])
        inside_x = (xs[None] >= box[:, 0:1]) & (xs[None] < box[:, 2:3])
        mask = (inside_y[:, :, None] & inside_x[:, None, :])[:, None]
        return images.masked_fill(mask, 0.0)


class Contrast(Perturbation):
    name, unit, ladder = "contrast", "contrast reduction", (0.3, 0.45, 0.6, 0.72, 0.82)
    keyed_draws = True

    def sample_params(self, shape: torch.Size, magnitude: Tensor, generator: torch.Generator | None) -> Params:
        return {"factor": 1.0 - magnitude}

    def apply_params(self, images: Tensor, params: Params) -> Tensor:
        return kornia.enhance.adjust_contrast_with_mean_subtraction(images, params["factor"].to(images.dtype))


class Brightness(Perturbation):
    name, unit, ladder = "brightness", "additive shift", (0.15, 0.25, 0.35, 0.45, 0.55)
    keyed_draws = True

    def sample_params(self, shape: torch.Size, magnitude: Tensor, generator: torch.Generator | None) -> Params:
        return {"shift": magnitude * _sign(shape[0], generator)}

    def apply_params(self, images: Tensor, params: Params) -> Tensor:
        return kornia.enhance.adjust_brightness(images, params["shift"].to(images.dtype), clip_output=False)


_REGISTRY: dict[str, Perturbation] = {}


def register_perturbation(perturbation: Perturbation, overwrite: bool = False) -> Perturbation:
    """Add a perturbation to the global registry so banks, the analyzer and generators know it by name.

    Raises:
        TypeError: if ``perturbation`` is not a :class:`Perturbation`.
        ValueError: if its name is empty, contains ``@``/``/``, its ladder is empty or not increasing, or
            the name is taken and ``overwrite`` is false.

    Example:
        >>> class Invert(Perturbation):
        ...     name, unit, ladder = "invert", "blend", (0.2, 0.4, 0.6, 0.8, 1.0)
        ...     def sample_params(self, shape, magnitude, generator):
        ...         return {"alpha": magnitude}
        ...     def apply_params(self, images, params):
        ...         a = params["alpha"].view(-1, 1, 1, 1)
        ...         return (1 - a) * images + a * (1 - images)
        >>> _ = register_perturbation(Invert())
        >>> PerturbationBank(["invert"]).apply("invert@5", torch.zeros(1, 1, 2, 2)).max().item()
        1.0
    """
    if not isinstance(perturbation, Perturbation):
        raise TypeError(f"`perturbation` must be a Perturbation, got {type(perturbation).__name__}")
    name = perturbation.name
    if not name or not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ValueError(f"A perturbation name must be non-empty letters, digits, '_' or '-', got {name!r}")
    ladder = perturbation.ladder
    if not ladder or any(b <= a for a, b in zip((0.0, *ladder), ladder)):
        raise ValueError(f"`ladder` of {name!r} must be non-empty, positive and increasing, got {ladder}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"A perturbation named {name!r} is registered already; pass `overwrite=True`")
    _REGISTRY[name] = perturbation
    return perturbation


def registered_perturbations() -> list[str]:
    """Names of every registered perturbation."""
    return list(_REGISTRY)


for _cls in (Rotation, Translation, Scale, GaussianBlur, MotionBlur, GaussianNoise, Occlusion, Contrast, Brightness):
    register_perturbation(_cls())
DEFAULT_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def parse_spec(spec: str) -> tuple[str, float]:
    """Split ``"rotation@3"`` into ``("rotation", 3.0)``; a bare name means the top severity."""
    if not isinstance(spec, str):
        raise TypeError(f"A perturbation spec must be a string like 'rotation@3', got {spec!r}")
    match = _SPEC.match(spec)
    if match:
        return match["name"], float(match["severity"])
    if spec in _REGISTRY:
        return spec, float(_REGISTRY[spec].max_severity)
    raise ValueError(f"Cannot parse perturbation spec {spec!r}; expected 'name@severity' like 'rotation@3'")


class PerturbationBank:
    """An ordered selection of registered perturbations, addressed by name.

    Args:
        names: which registered perturbations to include; ``None`` means the built-in nine
            (``rotation, translation, scale, gaussian_blur, motion_blur, gaussian_noise, occlusion,
            contrast, brightness``).

    Raises:
        TypeError: if ``names`` is a string.
        ValueError: if a name is not registered (the message lists the registered ones) or repeats.

    Example:
        >>> bank = PerturbationBank(["rotation", "gaussian_noise"])
        >>> g = torch.Generator().manual_seed(0)
        >>> out = bank.apply("rotation@3", torch.rand(2, 1, 28, 28), generator=g)
        >>> tuple(out.shape)
        (2, 1, 28, 28)
        >>> bank.names
        ['rotation', 'gaussian_noise']
    """

    def __init__(self, names: Sequence[str] | None = None) -> None:
        if isinstance(names, str):
            raise TypeError(f"`names` must be a sequence of names, not a string: {names!r}")
        names = list(DEFAULT_NAMES if names is None else names)
        unknown = [n for n in names if n not in _REGISTRY]
        if unknown:
            raise ValueError(f"`names` has unregistered perturbations {unknown}; registered: {list(_REGISTRY)}")
        if len(set(names)) != len(names):
            raise ValueError(f"`names` must not repeat a perturbation, got {names}")
        self._ops = {n: _REGISTRY[n] for n in names}

    @property
    def names(self) -> list[str]:
        return list(self._ops)

    def __getitem__(self, name: str) -> Perturbation:
        if name not in self._ops:
            raise KeyError(f"No perturbation {name!r} in this bank; it has {self.names}")
        return self._ops[name]

    def __contains__(self, name: object) -> bool:
        return name in self._ops

    def __iter__(self) -> Iterator[Perturbation]:
        return iter(self._ops.values())

    def __len__(self) -> int:
        return len(self._ops)

    def apply(self, spec: str, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Apply a perturbation given as ``"name@severity"``."""
        name, severity = parse_spec(spec)
        return self[name](images, severity, generator)

    def __repr__(self) -> str:
        return f"PerturbationBank({self.names})"


def default_bank() -> PerturbationBank:
    """The bank of the nine built-in perturbations."""
    return PerturbationBank()
