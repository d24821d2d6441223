"""`WeaknessProfile`: a typed, immutable, JSON-serialisable account of where a model fails.

The profile is what the analyzer produces and what every generator consumes. It is a pydantic model, so
it validates on construction, round-trips through JSON exactly, and is the same object on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ProfileChange", "Weakness", "WeaknessKind", "WeaknessProfile"]

WeaknessKind = Literal["class", "confusion", "perturbation", "slice"]
WEAKNESS_KINDS: tuple[str, ...] = ("class", "confusion", "perturbation", "slice")


class Weakness(BaseModel):
    """One measured weakness.

    Attributes:
        kind: ``"class"``, ``"confusion"``, ``"perturbation"`` or ``"slice"``.
        name: what failed: a class label (``"3"``), a confused pair (``"3->5"``: true 3 predicted 5), a
            perturbation name from the bank (``"rotation"``) or a slice (``"group=2"``).
        severity: the perturbation's severity level (1 = mildest); ``None`` for other kinds.
        error_rate: the error rate on the samples this weakness covers (for a confusion: the fraction of
            the true class predicted as the other class).
        gap: how much worse than the reference: ``error_rate - clean_error`` for classes, perturbations and
            slices; the confusion rate itself for confused pairs. Profiles are ranked by it.
        support: how many validation samples the figure rests on (across all ranks).
        target: the class index a class/confusion weakness is about.
        other: the class a confusion predicts instead of ``target``.

    Example:
        >>> w = Weakness(kind="perturbation", name="rotation", severity=3, error_rate=0.4, gap=0.3, support=512)
        >>> w.key
        'perturbation/rotation@3'
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: WeaknessKind
    name: str = Field(min_length=1)
    severity: float | None = None
    error_rate: float = Field(ge=0.0, le=1.0)
    gap: float = Field(ge=-1.0, le=1.0)
    support: int = Field(ge=0)
    target: int | None = None
    other: int | None = None

    @property
    def key(self) -> str:
        """A unique, log-friendly name: ``kind/name`` plus ``@severity`` for perturbations."""
        suffix = "" if self.severity is None else f"@{self.severity:g}"
        return f"{self.kind}/{self.name}{suffix}"


class ProfileChange(BaseModel):
    """How one weakness moved between two profiles (``None`` where it is absent from one of them)."""

    model_config = ConfigDict(frozen=True)

    key: str
    gap_before: float | None
    gap_after: float | None

    @property
    def change(self) -> float | None:
        if self.gap_before is None or self.gap_after is None:
            return None
        return self.gap_after - self.gap_before


class WeaknessProfile(BaseModel):
    """A ranked, immutable list of :class:`Weakness` entries measured at one validation.

    Attributes:
        weaknesses: sorted by ``gap``, largest first (the constructor sorts them).
        clean_error: error rate of the model on the clean validation data.
        num_samples: clean validation samples measured (across all ranks).
        epoch: the epoch the profile was measured at (``-1`` when unknown or pinned by hand).
        frontier: per perturbation, the (interpolated) severity at which its gap first reaches the
            analyzer's threshold; ``None`` when it never does within the ladder.
        pinned: ``True`` when a user set this profile instead of the analyzer measuring it.

    Example:
        >>> profile = WeaknessProfile(clean_error=0.1, num_samples=100, weaknesses=[
        ...     Weakness(kind="class", name="6", error_rate=0.3, gap=0.2, support=10, target=6),
        ...     Weakness(kind="perturbation", name="blur", severity=2, error_rate=0.5, gap=0.4, support=100),
        ... ])
        >>> [w.key for w in profile.top(1)]
        ['perturbation/blur@2']
        >>> WeaknessProfile.from_json(profile.to_json()) == profile
        True
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    TABLE_COLUMNS: ClassVar[tuple[str, ...]] = (
        "rank", "kind", "name", "severity", "error_rate", "gap", "support",
    )

    weaknesses: Sequence[Weakness] = ()
    clean_error: float = Field(default=0.0, ge=0.0, le=1.0)
    num_samples: int = Field(default=0, ge=0)
    epoch: int = -1
    frontier: dict[str, float | None] = Field(default_factory=dict)
    pinned: bool = False

    def model_post_init(self, __context: Any) -> None:
        ranked = tuple(sorted(self.weaknesses, key=lambda w: (-w.gap, w.key)))
        object.__setattr__(self, "weaknesses", ranked)

    def __len__(self) -> int:
        return len(self.weaknesses)

    @property
    def is_empty(self) -> bool:
        return not self.weaknesses

    def top(self, k: int = 5, kind: WeaknessKind | Sequence[str] | None = None) -> list[Weakness]:
        """The ``k`` largest-gap weaknesses, optionally of one kind (or several)."""
        if k < 0:
            raise ValueError(f"`k` must be >= 0, got {k}")
        return self.by_kind(kind)[:k] if kind is not None else list(self.weaknesses[:k])

    def by_kind(self, kind: WeaknessKind | Sequence[str]) -> list[Weakness]:
        """All weaknesses of the given kind(s), in rank order."""
        kinds = {kind} if isinstance(kind, str) else set(kind)
        unknown = kinds - set(WEAKNESS_KINDS)
        if unknown:
            raise ValueError(f"`kind` must be among {WEAKNESS_KINDS}, got {sorted(unknown)}")
        return [w for w in self.weaknesses if w.kind in kinds]

    def get(self, key: str) -> Weakness:
        """The weakness with this :attr:`Weakness.key`; raises ``KeyError`` listing the keys that exist."""
        for w in self.weaknesses:
            if w.key == key:
                return w
        raise KeyError(f"No weakness {key!r}; the profile has {[w.key for w in self.weaknesses]}")

    def perturbation_scores(self) -> dict[str, float]:
        """Per perturbation name, the mean positive gap over its severities (0 when it does not hurt)."""
        gaps: dict[str, list[float]] = {}
        for w in self.by_kind("perturbation"):
            gaps.setdefault(w.name, []).append(max(w.gap, 0.0))
        return {name: sum(v) / len(v) for name, v in sorted(gaps.items())}

    def diff(self, previous: WeaknessProfile | None) -> list[ProfileChange]:
        """Per weakness key, the gap before (in ``previous``) and now, ordered by current rank."""
        before = {w.key: w.gap for w in previous.weaknesses} if previous is not None else {}
        now = {w.key: w.gap for w in self.weaknesses}
        keys = [w.key for w in self.weaknesses] + sorted(set(before) - set(now))
        return [ProfileChange(key=k, gap_before=before.get(k), gap_after=now.get(k)) for k in keys]

    def rows(self) -> list[list[Any]]:
        """Table rows matching :attr:`TABLE_COLUMNS`, for loggers with tables (W&B) or printing."""
        return [
            [i + 1, w.kind, w.name, w.severity, round(w.error_rate, 4), round(w.gap, 4), w.support]
            for i, w in enumerate(self.weaknesses)
        ]

    def format(self, k: int = 10) -> str:
        """A plain-text table of the top ``k`` weaknesses."""
        lines = [f"WeaknessProfile(epoch={self.epoch}, clean_error={self.clean_error:.4f}, n={self.num_samples})"]
        lines.append(f"{'#':>3}  {'weakness':<32} {'error':>7} {'gap':>7} {'support':>8}")
        for i, w in enumerate(self.weaknesses[:k]):
            lines.append(f"{i + 1:>3}  {w.key:<32} {w.error_rate:>7.3f} {w.gap:>+7.3f} {w.support:>8d}")
        return "\n".join(lines)

    def to_json(self, indent: int | None = None) -> str:
        return self.model_dump_json(indent=indent)

    @classmethod
    def from_json(cls, data: str | bytes) -> WeaknessProfile:
        return cls.model_validate_json(data)
