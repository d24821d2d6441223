"""Runtime control of synthesis: one validated settings object for Python, LightningCLI and HTTP.

:class:`SynthesisSettings` holds the knobs (budget, refresh cadence, pause, pinned weight, generator mix,
pinned profile, sampler temperature). :class:`SynthesisController` queues changes from any thread, validates
them at once, and applies them at an epoch boundary in :meth:`SynthesisController.sync`: global rank 0
merges its queue and broadcasts the result, so every rank holds identical settings. It also carries a status
board that the datamodule publishes to and the HTTP server (:mod:`lightning_synth.server`) reads.

Wiring, in a datamodule or callback::

    controller = SynthesisController(settings, known_generators=[g.name for g in generators])
    # fit start, global rank 0 only (the server is not picklable: start it in the worker, not in __init__)
    server = ControlServer(controller, host="127.0.0.1", port=0, token=None).start()
    # train epoch start, on EVERY rank (a collective: it broadcasts rank 0's settings)
    for line in controller.sync(trainer):
        rank_zero_info(line)
    settings = controller.settings  # then: paused, generator_budgets(), effective_profile(), resolve_weight()
    # whenever the profile, pool, sampler or weighting change
    controller.publish(profile=profile, pool={...}, sampler={...}, weighting={...}, epoch=trainer.current_epoch)
    # checkpoints: controller.state_dict() / controller.load_state_dict(state); teardown: server.stop()
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from lightning_synth.profile import WeaknessProfile

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

__all__ = [
    "PendingPatch",
    "QueueFullError",
    "SettingsChange",
    "SettingsError",
    "SettingsPatch",
    "SynthesisController",
    "SynthesisSettings",
]

log = logging.getLogger(__name__)

MAX_BUDGET = 10_000_000
STATUS_SECTIONS: tuple[str, ...] = ("profile", "pool", "sampler", "weighting")


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
GeneratorMix = Annotated[
    dict[str, Annotated[float, Field(strict=True, ge=0.0), _Scalar]],
    Field(description="Share per generator name (normalised, not all 0); empty = automatic, by sampler mass"),
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


def _check_mix(mix: dict[str, float]) -> dict[str, float]:
    if mix and not any(share > 0 for share in mix.values()):
        raise ValueError("must give at least one generator a positive share when not empty")
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
        generator_mix: non-negative share per generator name, normalised over the generators in use
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
    sampler_temperature: Temperature = 2.0  # AdaptiveSampler's defaults
    sampler_uniform_mix: UniformMix = 0.2

    _mix = field_validator("generator_mix")(_check_mix)
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
        """Split :attr:`synthetic_budget` over ``names``; the counts sum to the budget exactly.

        Shares come from :attr:`generator_mix` when it is set, else from ``automatic`` (e.g. sampler mass per
        generator), else are equal. Largest remainders get the leftover samples. ``paused`` is not looked at:
        check it before refreshing.
        """
        if not names:
            return {}
        source = self.generator_mix or automatic or {}
        raw = {n: max(float(source.get(n, 0.0)), 0.0) for n in names}
        total = sum(raw.values())
        if total <= 0:
            if self.generator_mix:
                mix = self.generator_mix
                raise ValueError(f"`generator_mix` gives no share to any of {list(names)}, got {mix}")
            raw, total = dict.fromkeys(names, 1.0), float(len(names))
        exact = {n: self.synthetic_budget * v / total for n, v in raw.items()}
        counts = {n: math.floor(x) for n, x in exact.items()}
        by_remainder = sorted(names, key=lambda n: (counts[n] - exact[n], list(names).index(n)))
        for n in by_remainder[: self.synthetic_budget - sum(counts.values())]:
            counts[n] += 1
        return counts

    def as_metrics(self, prefix: str = "synth/control/") -> dict[str, float]:
        """Scalar view for ``log_dict``: numbers as floats, ``paused`` as 0/1, one entry per mix share."""
        metrics = {
            "synthetic_budget": float(self.synthetic_budget),
            "refresh_every_n_epochs": float(self.refresh_every_n_epochs),
            "paused": float(self.paused),
            "sampler_temperature": self.sampler_temperature,
            "sampler_uniform_mix": self.sampler_uniform_mix,
            "profile_pinned": float(self.pinned_profile is not None),
        }
        if self.synthetic_weight is not None:
            metrics["synthetic_weight"] = self.synthetic_weight
        total = sum(self.generator_mix.values())
        metrics.update({f"generator_mix/{n}": v / total for n, v in self.generator_mix.items()})
        return {prefix + k: v for k, v in metrics.items()}


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

    _mix = field_validator("generator_mix")(_check_mix)
    _profile = field_validator("pinned_profile")(_check_profile)

    def changes(self) -> dict[str, Any]:
        """The fields this patch sets, with their (validated) values."""
        return {name: getattr(self, name) for name in SETTING_NAMES if name in self.model_fields_set}


class SettingsError(ValueError):
    """Invalid settings: ``str()`` names each bad field; :attr:`errors` lists them in FastAPI's form."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.errors = errors
        super().__init__("Invalid synthesis settings: " + "; ".join(e["msg"] for e in errors))

    @classmethod
    def from_validation(cls, error: ValidationError) -> SettingsError:
        errors = []
        for e in error.errors(include_url=False):
            field = ".".join(str(part) for part in e["loc"]) or "settings"
            if e["type"] == "extra_forbidden":
                msg = f"`{field}` is not a setting; settings are {list(SETTING_NAMES)}"
            else:
                shown = repr(e.get("input"))
                shown = shown if len(shown) <= 80 else shown[:77] + "..."
                text = e["msg"].removeprefix("Value error, ")
                msg = f"{text} (got {shown})" if text.startswith("`") else f"`{field}`: {text} (got {shown})"
            errors.append({"loc": list(e["loc"]), "msg": msg, "type": e["type"]})
        return cls(errors)


class QueueFullError(RuntimeError):
    """Too many changes wait for the next epoch boundary (see ``max_pending``)."""


class PendingPatch(BaseModel):
    """A queued change, as shown by :attr:`SynthesisController.pending` and the HTTP API."""

    changes: dict[str, Any]
    source: str
    queued_at: str


class SettingsChange(BaseModel):
    """One applied (or rejected) change: who asked, when, and what moved."""

    model_config = ConfigDict(frozen=True)

    field: str
    before: str
    after: str
    source: str
    queued_at: str
    epoch: int | None = None
    step: int | None = None
    status: Literal["applied", "rejected"] = "applied"

    @property
    def message(self) -> str:
        where = "" if self.epoch is None else f"epoch {self.epoch} step {self.step}: "
        if self.status == "rejected":
            return f"{where}rejected change from {self.source} (queued {self.queued_at}): {self.after}"
        by = f"(by {self.source}, queued {self.queued_at})"
        return f"{where}{self.field} {self.before} -> {self.after} {by}"


@dataclass(frozen=True)
class _Queued:
    patch: SettingsPatch
    source: str
    queued_at: str

    def view(self) -> PendingPatch:
        return PendingPatch(
            changes=self.patch.model_dump(mode="json", exclude_unset=True), source=self.source,
            queued_at=self.queued_at,
        )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _describe(value: Any) -> str:
    if isinstance(value, WeaknessProfile):
        return f"WeaknessProfile({len(value)} weaknesses, epoch={value.epoch})"
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


def _json_safe(value: Any, path: str) -> Any:
    """A JSON-ready copy: tensors/arrays to lists, models to dicts, non-finite floats to ``None``."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    elif hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        value = value.tolist()
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v, f"{path}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"`{path}` must be JSON-serialisable, got {type(value).__name__}: {value!r:.80}")


class SynthesisController:
    """Applied settings, a thread-safe queue of changes, and a status board; synchronised across ranks.

    Changes (:meth:`update`, :meth:`apply_patch`, the HTTP API) are validated at once against the settings
    they will be merged into and queued. :meth:`sync`, called by every rank at the same epoch boundary,
    merges global rank 0's queue and broadcasts the result: all ranks then hold identical settings and
    history; other ranks' queues are dropped.

    Args:
        settings: initial settings (defaults when ``None``).
        known_generators: generator names that ``generator_mix`` may use; ``None`` accepts any name.
        max_history: how many change events to keep (and checkpoint).
        max_pending: how many changes may wait for the next :meth:`sync`; more raise :class:`QueueFullError`.

    Raises:
        TypeError: ``settings`` is not a :class:`SynthesisSettings`.
        ValueError: a bad ``max_history``, ``max_pending`` or ``known_generators``, or a mix naming unknown
            generators.

    Example:
        >>> controller = SynthesisController(known_generators=["augment", "gan"])
        >>> controller.update(synthetic_budget=512, generator_mix={"gan": 1.0}).synthetic_budget
        512
        >>> controller.settings.synthetic_budget  # applied at the next epoch boundary
        2048
        >>> [line.split(" (by")[0] for line in controller.sync()]
        ['synthetic_budget 2048 -> 512', 'generator_mix {} -> {"gan": 1.0}']
        >>> controller.settings.synthetic_budget
        512
    """

    def __init__(
        self,
        settings: SynthesisSettings | None = None,
        known_generators: Sequence[str] | None = None,
        max_history: int = 1000,
        max_pending: int = 1000,
    ) -> None:
        if settings is not None and not isinstance(settings, SynthesisSettings):
            raise TypeError(f"`settings` must be a SynthesisSettings or None, got {type(settings).__name__}")
        if isinstance(max_history, bool) or not isinstance(max_history, int) or max_history < 1:
            raise ValueError(f"`max_history` must be an int >= 1, got {max_history!r}")
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"`max_pending` must be an int >= 1, got {max_pending!r}")
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._settings = settings.model_copy(deep=True) if settings is not None else SynthesisSettings()
        self._pending: list[_Queued] = []
        self._effective = self._settings  # applied + pending, kept up to date so a change costs one merge
        self._history: deque[SettingsChange] = deque(maxlen=max_history)
        self._sections: dict[str, dict[str, Any]] = {}
        self._known: tuple[str, ...] | None = None
        self.known_generators = known_generators

    def __getstate__(self) -> dict[str, Any]:  # picklable for ddp_spawn; the lock is per process
        with self._lock:
            state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- reading ------------------------------------------------------------------------------------------
    @property
    def settings(self) -> SynthesisSettings:
        """A copy of the applied settings (change them with :meth:`update`, not by assignment)."""
        with self._lock:
            return self._settings.model_copy(deep=True)

    @property
    def effective(self) -> SynthesisSettings:
        """The settings as they will be after the next :meth:`sync` (applied + queued changes)."""
        with self._lock:
            return self._effective.model_copy(deep=True)

    @property
    def pending(self) -> list[PendingPatch]:
        with self._lock:
            return [q.view() for q in self._pending]

    @property
    def history(self) -> list[SettingsChange]:
        with self._lock:
            return list(self._history)

    @property
    def known_generators(self) -> tuple[str, ...] | None:
        return self._known

    @known_generators.setter
    def known_generators(self, names: Sequence[str] | None) -> None:
        if names is not None:
            if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
                raise ValueError(f"`known_generators` must be non-empty names or None, got {names!r}")
            names = tuple(names)
        with self._lock:
            self._check_names(self._settings, names)
            self._known = names
            self._effective = self._preview()

    # -- writing ------------------------------------------------------------------------------------------
    def update(self, *, source: str = "python", **changes: Any) -> SynthesisSettings:
        """Queue ``changes`` (setting name -> value); returns the settings they will lead to.

        Raises:
            ValueError: (a :class:`SettingsError`) naming each bad or unknown field.
            QueueFullError: ``max_pending`` changes already wait for the next :meth:`sync`.
        """
        return self.apply_patch(changes, source=source)

    def apply_patch(
        self, patch: SettingsPatch | Mapping[str, Any], *, source: str = "python"
    ) -> SynthesisSettings:
        """Validate ``patch`` against the current settings plus the queue, then queue it."""
        if not isinstance(patch, SettingsPatch):
            if not isinstance(patch, Mapping):
                raise TypeError(f"`patch` must be a SettingsPatch or a mapping, got {type(patch).__name__}")
            try:
                patch = SettingsPatch.model_validate(dict(patch))
            except ValidationError as error:
                raise SettingsError.from_validation(error) from None
        with self._lock:
            if len(self._pending) >= self.max_pending:
                raise QueueFullError(
                    f"{len(self._pending)} changes already wait for the next epoch boundary (`max_pending`="
                    f"{self.max_pending}); retry after it"
                )
            preview = self._merge(self._effective, patch)
            if patch.model_fields_set:
                self._pending.append(_Queued(patch, source, _now()))
                self._effective = preview
            return preview.model_copy(deep=True)

    def sync(self, trainer: Trainer | None = None) -> list[str]:
        """Apply queued changes at an epoch boundary; returns one message per change, for logging.

        Call it on every rank at the same point (it is a collective: ``trainer.strategy.broadcast``).
        Global rank 0 merges its queue, then its settings and change events are broadcast to all ranks.
        Without a trainer it merges the local queue (single process, e.g. before ``fit``).
        """
        rank = 0 if trainer is None else int(getattr(trainer, "global_rank", 0))
        with self._lock:
            queued, self._pending = self._pending, []
            current = self._settings
        payload: dict[str, Any] | None = None
        if rank == 0:
            epoch = None if trainer is None else int(trainer.current_epoch)
            step = None if trainer is None else int(trainer.global_step)
            settings, events = self._merge_queue(current, queued, epoch, step)
            payload = {"settings": settings.model_dump(mode="json"), "events": [dict(e) for e in events]}
        elif queued:
            log.debug("rank %d: dropping %d queued change(s); only global rank 0's apply", rank, len(queued))
        if trainer is not None:
            payload = trainer.strategy.broadcast(payload, src=0)
        if payload is None:
            raise RuntimeError("`trainer.strategy.broadcast` returned nothing: call `sync()` on every rank.")
        settings = SynthesisSettings.model_validate(payload["settings"])
        events = [SettingsChange.model_validate(e) for e in payload["events"]]
        with self._lock:
            self._settings = settings
            self._effective = self._preview()  # over changes queued while this sync ran
            self._history.extend(events)
        for event in events if rank == 0 else ():
            log.info("lightning_synth control: %s", event.message)
        return [e.message for e in events]

    # -- status board -------------------------------------------------------------------------------------
    def publish(
        self,
        *,
        profile: WeaknessProfile | Mapping[str, Any] | None = None,
        pool: Mapping[str, Any] | None = None,
        sampler: Mapping[str, Any] | None = None,
        weighting: Mapping[str, Any] | None = None,
        epoch: int | None = None,
    ) -> None:
        """Post the latest state of each part (sections left ``None`` keep their last value).

        Values are copied into JSON-ready form: tensors and arrays become lists, non-finite floats ``None``.

        Raises:
            TypeError: a section is not a mapping or holds something that cannot become JSON.
        """
        given = {"profile": profile, "pool": pool, "sampler": sampler, "weighting": weighting}
        for name, value in given.items():
            if value is not None and not isinstance(value, (Mapping, BaseModel)):
                raise TypeError(f"`{name}` must be a mapping or a pydantic model, got {type(value).__name__}")
        entries = {
            name: {"epoch": epoch, "updated_at": _now(), "data": _json_safe(value, name)}
            for name, value in given.items()
            if value is not None
        }
        with self._lock:
            self._sections.update(entries)

    def section(self, name: str) -> dict[str, Any] | None:
        """The last published entry ``{"epoch", "updated_at", "data"}`` of a section, or ``None``."""
        if name not in STATUS_SECTIONS:
            raise KeyError(f"No status section {name!r}; sections are {list(STATUS_SECTIONS)}")
        with self._lock:
            entry = self._sections.get(name)
            return None if entry is None else json.loads(json.dumps(entry))

    def status(self, history: int = 20) -> dict[str, Any]:
        """One JSON-ready snapshot: applied and effective settings, queue, last ``history`` changes, sections."""
        with self._lock:
            return json.loads(json.dumps({
                "settings": self._settings.model_dump(mode="json"),
                "effective": self._effective.model_dump(mode="json"),
                "pending": [q.view().model_dump() for q in self._pending],
                "history": [e.model_dump() for e in list(self._history)[-history:]] if history > 0 else [],
                "sections": {name: self._sections.get(name) for name in STATUS_SECTIONS},
            }))

    # -- checkpointing ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "settings": self._settings.model_dump(mode="json"),
                "pending": [q.view().model_dump() for q in self._pending],
                "history": [e.model_dump() for e in self._history],
            }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        missing = {"settings", "pending", "history"} - set(state_dict)
        if missing:
            raise KeyError(f"`state_dict` lacks {sorted(missing)}; it has {sorted(state_dict)}")
        try:
            settings = SynthesisSettings.model_validate(state_dict["settings"])
            pending = [
                _Queued(SettingsPatch.model_validate(p["changes"]), p["source"], p["queued_at"])
                for p in state_dict["pending"]
            ]
        except ValidationError as error:
            raise SettingsError.from_validation(error) from None
        history = [SettingsChange.model_validate(e) for e in state_dict["history"]]
        with self._lock:
            self._check_names(settings, self._known)
            self._settings, self._pending = settings, pending
            self._effective = self._preview()
            self._history.clear()
            self._history.extend(history)

    # -- helpers (call with the lock held) ---------------------------------------------------------------
    def _preview(self) -> SynthesisSettings:
        settings = self._settings
        for queued in self._pending:
            try:
                settings = self._merge(settings, queued.patch)
            except SettingsError:  # the known generators changed since; sync will report it rejected
                continue
        return settings

    def _merge(self, settings: SynthesisSettings, patch: SettingsPatch) -> SynthesisSettings:
        changes = patch.changes()
        if not changes:
            return settings
        try:
            merged = SynthesisSettings.model_validate({**dict(settings), **changes})
        except ValidationError as error:
            raise SettingsError.from_validation(error) from None
        self._check_names(merged, self._known)
        return merged

    def _merge_queue(
        self, settings: SynthesisSettings, queued: list[_Queued], epoch: int | None, step: int | None
    ) -> tuple[SynthesisSettings, list[SettingsChange]]:
        events: list[SettingsChange] = []
        for q in queued:
            stamp: dict[str, Any] = dict(source=q.source, queued_at=q.queued_at, epoch=epoch, step=step)
            try:
                merged = self._merge(settings, q.patch)
            except SettingsError as error:  # valid when queued, but the known generators changed since
                rejected = SettingsChange(field="*", before="", after=str(error), status="rejected", **stamp)
                events.append(rejected)
                continue
            for name in SETTING_NAMES:
                old, new = getattr(settings, name), getattr(merged, name)
                if old != new:
                    change = SettingsChange(field=name, before=_describe(old), after=_describe(new), **stamp)
                    events.append(change)
            settings = merged
        return settings, events

    @staticmethod
    def _check_names(settings: SynthesisSettings, known: tuple[str, ...] | None) -> None:
        unknown = sorted(set(settings.generator_mix) - set(known)) if known is not None else []
        if unknown:
            raise SettingsError([{
                "loc": ["generator_mix"], "type": "unknown_generator",
                "msg": f"`generator_mix` names unknown generators {unknown}; known: {list(known or ())}",
            }])
