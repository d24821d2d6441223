"""`SynthesisSettings`: the knobs of synthesis as one validated pydantic model, and `SettingsPatch`, a change.

Every bound is a pydantic ``Annotated`` constraint, so Python, LightningCLI and the HTTP API (whose OpenAPI
schema shows them) validate the same way. A value that is accepted can be applied: in particular a generator
mix is accepted only if its budget split can be computed.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from lightning_synth.allocation import largest_remainder
from lightning_synth.profile import WeaknessProfile

__all__ = ["SETTING_NAMES", "SettingsPatch", "SynthesisSettings", "check_generator_mix"]

log = logging.getLogger(__name__)

MAX_BUDGET = 10_000_000
MAX_SHARE = 1e6  # shares are relative; the bound keeps their sum finite, so the split is always computable
MAX_GENERATORS = 64


def _unwrap_scalar(value: Any) -> Any:
    """Numpy and torch scalars become Python numbers (the fields are otherwise strict)."""
    if type(value).__module__.split(".")[0] in ("numpy", "torch") and hasattr(value, "item"):
        return value.item()
    return value


def _parse_profile(value: Any) -> Any:
    """Parse a dict (a JSON body, a YAML config) strictly, as JSON: no ``0`` for ``false``, no NaN."""
    if not isinstance(value, Mapping):
        return value
    try:
        text = json.dumps(dict(value), allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"must be JSON data: {error}") from None
    try:
        return WeaknessProfile.model_validate_json(text, strict=True)
    except ValidationError as error:
        where = "; ".join(f"`{'.'.join(map(str, e['loc']))}`: {e['msg']}" for e in error.errors())
        raise ValueError(f"is not a valid WeaknessProfile: {where}") from None


# Shared by the settings and the patch, so that both validate (and document) each field the same way.
# Strict: no bool-for-number or str-for-number coercion (an int is still fine where a float is asked for).
_Scalar = BeforeValidator(_unwrap_scalar)  # after the Field: its bounds stay in the JSON schema
SyntheticBudget = Annotated[
    int, Field(strict=True, ge=0, le=MAX_BUDGET, description="Synthetic samples per refresh."), _Scalar
]
RefreshEvery = Annotated[
    int, Field(strict=True, ge=1, le=100_000, description="Refresh the pool every N epochs."), _Scalar
]
Paused = Annotated[
    bool, Field(strict=True, description="Pause generation; the existing pool keeps being used."), _Scalar
]
SyntheticWeight = Annotated[
    float,
    Field(strict=True, ge=0.0, le=10.0,
          description="Pinned multiplier of the synthetic share (0 = no synthetic data); null = automatic."),
    _Scalar,
]
GeneratorName = Annotated[str, Field(min_length=1, max_length=100)]
Share = Annotated[float, Field(strict=True, ge=0.0, le=MAX_SHARE), _Scalar]
GeneratorMix = Annotated[
    dict[GeneratorName, Share],
    Field(max_length=MAX_GENERATORS,
          description="Relative share per generator name (not all 0); empty = automatic, by sampler mass"),
]
PinnedProfile = Annotated[
    WeaknessProfile,
    Field(description="Profile generators use instead of the measured one; null = measured."),
    BeforeValidator(_parse_profile),
]
Temperature = Annotated[
    float, Field(strict=True, gt=0.0, le=1e6, description="Sampler temperature on per-sample losses."),
    _Scalar,
]
UniformMix = Annotated[
    float, Field(strict=True, ge=0.0, le=1.0, description="Share of sampler mass spread uniformly."), _Scalar
]


def check_generator_mix(mix: Mapping[str, float]) -> dict[str, float]:
    """The one generator-mix rule: shares finite, in ``[0, 1e6]``, not all zero; its budget split computes.

    Raises:
        ValueError: naming the rule that ``mix`` breaks.

    Example:
        >>> check_generator_mix({"targeted": 3, "scenario": 1})
        {'targeted': 3, 'scenario': 1}
        >>> check_generator_mix({"targeted": 0.0})
        Traceback (most recent call last):
        ...
        ValueError: must give at least one generator a positive share when not empty
    """
    mix = dict(mix)
    bad = {n: s for n, s in mix.items() if not (isinstance(s, (int, float)) and 0 <= s <= MAX_SHARE)}
    if bad:
        raise ValueError(f"shares must be numbers in [0, {MAX_SHARE:g}], got {bad}")
    if mix and not any(share > 0 for share in mix.values()):
        raise ValueError("must give at least one generator a positive share when not empty")
    if mix:
        largest_remainder(MAX_BUDGET, mix)  # applicable: the split of the largest budget computes
    return mix


def _check_profile(profile: WeaknessProfile | None) -> WeaknessProfile | None:
    if profile is None:
        return None
    floats = [w.severity for w in profile.weaknesses] + list(profile.frontier.values())
    if any(v is not None and not math.isfinite(v) for v in floats):
        raise ValueError("severities and frontier values must be finite (or null)")
    return profile if profile.pinned else profile.model_copy(update={"pinned": True})


class SynthesisSettings(BaseModel):
    """The knobs of synthesis, validated on construction and on every assignment.

    Args:
        synthetic_budget: synthetic samples generated per refresh, in ``[0, 10_000_000]``.
        refresh_every_n_epochs: refresh the synthetic pool every this many epochs (``>= 1``).
        paused: pause generation; the existing pool keeps being sampled.
        synthetic_weight: ``None`` lets the weighting module decide; a float in ``[0, 10]`` pins the multiplier
            of the synthetic share (0 turns synthetic data off).
        generator_mix: relative share in ``[0, 1e6]`` per generator name, normalised over the generators in use
            (unlisted generators get none); empty = automatic, by sampler mass.
        pinned_profile: when set, generators use it instead of the measured profile (marked ``pinned``).
        sampler_temperature: temperature of the adaptive sampler (``> 0``).
        sampler_uniform_mix: share of sampler mass spread uniformly, in ``[0, 1]``.

    Example:
        >>> s = SynthesisSettings(synthetic_budget=100, generator_mix={"augment": 3, "gan": 1})
        >>> s.generator_budgets(["augment", "gan"])
        {'augment': 75, 'gan': 25}
        >>> s.resolve_weight(automatic=0.4)
        0.4
        >>> s.synthetic_weight = 0.9  # validated on assignment
        >>> s.resolve_weight(automatic=0.4)
        0.9
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    synthetic_budget: SyntheticBudget = 2048
    refresh_every_n_epochs: RefreshEvery = 1
    paused: Paused = False
    synthetic_weight: SyntheticWeight | None = None
    generator_mix: GeneratorMix = Field(default_factory=dict)
    pinned_profile: PinnedProfile | None = None
    sampler_temperature: Temperature = 2.0  # AdaptiveSampler's default
    sampler_uniform_mix: UniformMix = 0.2  # the engine's default: loss-focused draws, a 20% uniform floor

    _mix = field_validator("generator_mix")(check_generator_mix)
    _profile = field_validator("pinned_profile")(_check_profile)

    def effective_profile(self, measured: WeaknessProfile | None) -> WeaknessProfile | None:
        """The profile generators should use: the pinned one when set, else ``measured``."""
        return self.pinned_profile if self.pinned_profile is not None else measured

    def resolve_weight(self, automatic: float) -> float:
        """The synthetic weight to use: the pinned one when set, else ``automatic``."""
        return self.synthetic_weight if self.synthetic_weight is not None else automatic

    def generator_budgets(
        self, names: Sequence[str], automatic: Mapping[str, float] | None = None
    ) -> dict[str, int]:
        """Split :attr:`synthetic_budget` over ``names`` (:func:`~lightning_synth.allocation.largest_remainder`).

        Shares come from :attr:`generator_mix` when it is set, else from ``automatic`` (e.g. sampler mass per
        generator; non-finite or negative values count as 0), else are equal. The counts sum to the budget.
        A mix that gives none of ``names`` a share is not fatal: it is logged and the automatic split is used.
        ``paused`` is not looked at: check it before refreshing.
        """
        if not names:
            return {}
        if self.generator_mix:
            shares = {n: float(self.generator_mix.get(n, 0.0)) for n in names}
            if any(shares.values()):
                return largest_remainder(self.synthetic_budget, shares)
            log.error("`generator_mix` %s gives no share to any of %s; using the automatic split",
                      self.generator_mix, list(names))
        source = automatic or {}
        shares = {n: float(source.get(n, 0.0)) for n in names}
        shares = {n: v if math.isfinite(v) and v > 0 else 0.0 for n, v in shares.items()}
        return largest_remainder(self.synthetic_budget, shares)


SETTING_NAMES: tuple[str, ...] = tuple(SynthesisSettings.model_fields)
_NULLABLE = ("synthetic_weight", "pinned_profile")


def _drop_null_branch(schema: dict[str, Any]) -> None:
    """JSON schema of a patch field that may be omitted but not set to null."""
    branches = [b for b in schema.pop("anyOf", []) if b.get("type") != "null"]
    if len(branches) == 1:
        schema.update(branches[0])
    schema.pop("default", None)


class SettingsPatch(BaseModel):
    """A partial update of :class:`SynthesisSettings`: only the fields given are changed.

    ``synthetic_weight`` and ``pinned_profile`` may be set to ``None`` (back to automatic / measured); the
    other fields may be omitted but not nulled. The patch is validated again when merged into the settings.

    Example:
        >>> SettingsPatch(synthetic_budget=512, synthetic_weight=None).changes()
        {'synthetic_budget': 512, 'synthetic_weight': None}
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    synthetic_budget: SyntheticBudget | None = Field(default=None, json_schema_extra=_drop_null_branch)
    refresh_every_n_epochs: RefreshEvery | None = Field(default=None, json_schema_extra=_drop_null_branch)
    paused: Paused | None = Field(default=None, json_schema_extra=_drop_null_branch)
    synthetic_weight: SyntheticWeight | None = None
    generator_mix: GeneratorMix | None = Field(default=None, json_schema_extra=_drop_null_branch)
    pinned_profile: PinnedProfile | None = None
    sampler_temperature: Temperature | None = Field(default=None, json_schema_extra=_drop_null_branch)
    sampler_uniform_mix: UniformMix | None = Field(default=None, json_schema_extra=_drop_null_branch)

    @field_validator(*(n for n in SETTING_NAMES if n not in _NULLABLE), mode="before")
    @classmethod
    def _not_null(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            raise ValueError(f"`{info.field_name}` cannot be null; leave it out to keep the current value")
        return value

    _mix = field_validator("generator_mix")(check_generator_mix)
    _profile = field_validator("pinned_profile")(_check_profile)

    def changes(self) -> dict[str, Any]:
        """The fields this patch sets, with their (validated) values."""
        return {name: getattr(self, name) for name in SETTING_NAMES if name in self.model_fields_set}
