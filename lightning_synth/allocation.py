"""One way to split an integer budget by shares: the largest-remainder method, the same on every rank."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

__all__ = ["largest_remainder"]


def largest_remainder(
    total: int, shares: Mapping[str, float], generator: torch.Generator | None = None
) -> dict[str, int]:
    """Split ``total`` into non-negative integer counts proportional to ``shares``; they sum to ``total``.

    The integer parts of ``total * share`` are fixed; the samples left over go to the largest fractional parts
    (ties broken by the order of ``shares``), or, with ``generator``, are drawn without replacement in
    proportion to the fractional parts (so a small share still gets its expected count over many calls).
    Shares are normalised; when they are all zero the split is uniform.

    Args:
        total: the integer to split (``>= 0``).
        shares: name -> finite, non-negative share.
        generator: a seeded generator for the randomised remainder, or ``None`` for the deterministic rule.

    Raises:
        ValueError: if ``total`` is negative or a share is negative, NaN or infinite.

    Example:
        >>> largest_remainder(10, {"a": 2.0, "b": 1.0})
        {'a': 7, 'b': 3}
        >>> largest_remainder(3, {"a": 0.0, "b": 0.0, "c": 0.0})
        {'a': 1, 'b': 1, 'c': 1}
        >>> sum(largest_remainder(7, {"a": 1.0, "b": 1.0, "c": 1.0}, torch.Generator().manual_seed(0)).values())
        7
    """
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise ValueError(f"`total` must be an int >= 0, got {total!r}")
    bad = {k: v for k, v in shares.items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0)}
    if bad:
        raise ValueError(f"`shares` must be finite and >= 0, got {bad}")
    names = list(shares)
    if not names:
        return {}
    weights = torch.tensor([float(shares[n]) for n in names], dtype=torch.float64)
    norm = float(weights.sum())
    p = weights / norm if norm > 0 else torch.full_like(weights, 1.0 / len(names))
    exact = p * total
    # The epsilon keeps float error (0.1 * 30 = 2.9999...) from costing a name its integer part.
    counts = (exact + 1e-9).floor().long()
    rest = total - int(counts.sum())
    if rest > 0:
        frac = (exact - counts).clamp(min=0)
        if generator is None or int((frac > 0).sum()) < rest:
            extra = torch.argsort(-frac.mul(1e9).round(), stable=True)[:rest]
        else:
            extra = torch.multinomial(frac, rest, replacement=False, generator=generator)
        counts[extra] += 1
    return dict(zip(names, counts.tolist()))
