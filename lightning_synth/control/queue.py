"""`ChangeQueue`: applied settings plus the changes waiting for the next epoch boundary, bounded in count and bytes.

Changes are validated when queued, against the settings they will be merged into. :meth:`ChangeQueue.sync`,
called by every rank at the same epoch boundary, merges the queue and broadcasts global rank 0's result through
any ``comm`` with ``broadcast(obj, src=0)`` (``trainer.strategy`` has one), so every rank holds identical
settings. A change that cannot be applied any more (the known generators changed, or it came back from a
checkpoint that no longer validates) is dropped there and reported as ``rejected``: never raised.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from lightning_synth._validation import check_int
from lightning_synth.control._lock import LockOwner
from lightning_synth.control.errors import QueueFullError, SettingsError
from lightning_synth.control.settings import SETTING_NAMES, SettingsPatch, SynthesisSettings
from lightning_synth.profile import WeaknessProfile

__all__ = ["ChangeQueue", "Comm", "PendingPatch", "QueueView", "SettingsChange"]

log = logging.getLogger(__name__)


class Comm(Protocol):
    """What :meth:`ChangeQueue.sync` needs from a communication layer (``trainer.strategy`` fits)."""

    def broadcast(self, obj: Any, src: int = 0) -> Any: ...


class PendingPatch(BaseModel):
    """A queued change, summarised: each value described in at most 120 characters."""

    changes: dict[str, str]
    source: str
    queued_at: str
    bytes: int


class QueueView(BaseModel):
    """The queue at a glance: how full it is, and a summary of each change in it."""

    count: int
    bytes: int
    max_count: int
    max_bytes: int
    items: list[PendingPatch]


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
    raw: dict[str, Any]  # the changes as JSON data: what is checkpointed and counted in bytes
    source: str
    queued_at: str
    patch: SettingsPatch | None = None  # None: could not be read back; ``error`` says why
    error: str | None = None
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nbytes", len(json.dumps(self.raw, default=str)))

    def view(self) -> PendingPatch:
        changes = {k: describe(v) for k, v in self.raw.items()}
        return PendingPatch(changes=changes, source=self.source, queued_at=self.queued_at, bytes=self.nbytes)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def describe(value: Any) -> str:
    """A short, log-friendly text of a setting's value (a profile is named, not dumped)."""
    if isinstance(value, WeaknessProfile):
        return f"WeaknessProfile({len(value)} weaknesses, epoch={value.epoch})"
    if isinstance(value, Mapping) and "weaknesses" in value and isinstance(value["weaknesses"], list):
        return f"WeaknessProfile({len(value['weaknesses'])} weaknesses, epoch={value.get('epoch')})"
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


class ChangeQueue(LockOwner):
    """Applied settings and a thread-safe queue of validated changes, merged at :meth:`sync`.

    Args:
        settings: initial settings (defaults when ``None``).
        known_generators: generator names that ``generator_mix`` may use; ``None`` accepts any name.
        max_pending: how many changes may wait for the next :meth:`sync`.
        max_pending_bytes: how many bytes of changes (as JSON) may wait; a 1 MB pinned profile counts 1 MB.

    Raises:
        TypeError: ``settings`` is not a :class:`SynthesisSettings`, or a bound is not an int.
        ValueError: a bound is too small, bad ``known_generators``, or a mix naming unknown generators.

    Example:
        >>> queue = ChangeQueue(max_pending_bytes=1024)
        >>> queue.submit({"paused": True}).paused
        True
        >>> [e.message.split(" (by")[0] for e in queue.sync()]
        ['paused false -> true']
    """

    def __init__(
        self,
        settings: SynthesisSettings | None = None,
        known_generators: Sequence[str] | None = None,
        max_pending: int = 1000,
        max_pending_bytes: int = 4 << 20,
    ) -> None:
        if settings is not None and not isinstance(settings, SynthesisSettings):
            raise TypeError(f"`settings` must be a SynthesisSettings or None, got {type(settings).__name__}")
        check_int("max_pending", max_pending, 1)
        check_int("max_pending_bytes", max_pending_bytes, 1024)
        self.max_pending, self.max_pending_bytes = max_pending, max_pending_bytes
        super().__init__()
        self._settings = settings.model_copy(deep=True) if settings is not None else SynthesisSettings()
        self._pending: list[_Queued] = []
        self._effective = self._settings  # applied + pending, kept up to date so a change costs one merge
        self._known: tuple[str, ...] | None = None
        self.known_generators = known_generators

    # -- reading ------------------------------------------------------------------------------------------
    @property
    def settings(self) -> SynthesisSettings:
        """A copy of the applied settings."""
        with self._lock:
            return self._settings.model_copy(deep=True)

    @property
    def effective(self) -> SynthesisSettings:
        """The settings as they will be after the next :meth:`sync` (applied + queued changes)."""
        with self._lock:
            return self._effective.model_copy(deep=True)

    def view(self) -> QueueView:
        with self._lock:
            return self._view()

    def snapshot(self) -> dict[str, Any]:
        """Applied settings, effective settings and the queue summary, consistent with each other (JSON)."""
        with self._lock:
            return {
                "settings": self._settings.model_dump(mode="json"),
                "effective": self._effective.model_dump(mode="json"),
                "pending": self._view().model_dump(),
            }

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
            _check_names(self._settings, names)
            self._known = names
            self._effective = self._preview()

    # -- writing ------------------------------------------------------------------------------------------
    def submit(self, patch: SettingsPatch | Mapping[str, Any], source: str = "python") -> SynthesisSettings:
        """Validate ``patch`` against the applied settings plus the queue, then queue it.

        Returns:
            The settings the queue leads to.

        Raises:
            SettingsError: naming each bad or unknown field.
            QueueFullError: ``max_pending`` changes or ``max_pending_bytes`` bytes already wait.
        """
        patch = _as_patch(patch)
        queued = _Queued(patch.model_dump(mode="json", exclude_unset=True), source, now(), patch)
        with self._lock:
            used = sum(q.nbytes for q in self._pending)
            if len(self._pending) >= self.max_pending or used + queued.nbytes > self.max_pending_bytes:
                raise QueueFullError(
                    f"the change queue is full ({len(self._pending)} changes, {used} bytes; `max_pending`="
                    f"{self.max_pending}, `max_pending_bytes`={self.max_pending_bytes}; this change: "
                    f"{queued.nbytes} bytes): retry after the next epoch boundary"
                )
            preview = self._merge(self._effective, patch)
            if patch.model_fields_set:
                self._pending.append(queued)
                self._effective = preview
            return preview.model_copy(deep=True)

    def sync(self, comm: Comm | None = None, *, epoch: int | None = None, step: int | None = None
             ) -> list[SettingsChange]:
        """Apply queued changes at an epoch boundary; returns the applied and rejected changes.

        Call it on every rank at the same point: with a ``comm`` it is a collective (``comm.broadcast``) and
        every rank adopts global rank 0's result; other ranks' queues are dropped. Without one it merges the
        local queue (a single process). ``epoch`` and ``step`` stamp the change history.
        """
        with self._lock:
            queued, self._pending = self._pending, []
            current = self._settings
        settings, events = self._merge_queue(current, queued, epoch, step)
        payload: dict[str, Any] | None = {
            "settings": settings.model_dump(mode="json"), "events": [e.model_dump() for e in events],
        }
        if comm is not None:
            rank = comm_rank(comm)
            if rank != 0 and queued:
                log.debug("rank %d: dropping %d queued change(s); only global rank 0's apply", rank, len(queued))
            payload = comm.broadcast(payload, src=0)
        if payload is None:
            raise RuntimeError("`comm.broadcast` returned nothing: call `sync()` on every rank.")
        settings = SynthesisSettings.model_validate(payload["settings"])
        events = [SettingsChange.model_validate(e) for e in payload["events"]]
        with self._lock:
            self._settings = settings
            self._effective = self._preview()  # over changes queued while this sync ran
        return events

    # -- checkpointing ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "settings": self._settings.model_dump(mode="json"),
                "pending": [{"changes": q.raw, "source": q.source, "queued_at": q.queued_at} for q in self._pending],
            }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore; what no longer validates is not fatal: it is rejected (and logged) at the next :meth:`sync`.

        A bad applied setting keeps its current value; a bad queued change stays queued as a rejection.

        Raises:
            KeyError: ``state_dict`` lacks ``settings`` or ``pending``.
        """
        missing = {"settings", "pending"} - set(state_dict)
        if missing:
            raise KeyError(f"`state_dict` lacks {sorted(missing)}; it has {sorted(state_dict)}")
        with self._lock:
            current, known = self._settings, self._known
        settings, dropped = _restore_settings(dict(state_dict["settings"]), current, known)
        pending = [dropped] if dropped is not None else []
        for p in state_dict["pending"]:
            raw, source, queued_at = dict(p["changes"]), str(p["source"]), str(p["queued_at"])
            try:
                pending.append(_Queued(raw, source, queued_at, _as_patch(raw)))
            except SettingsError as error:
                log.error("lightning_synth control: a queued change in the checkpoint is invalid: %s", error)
                pending.append(_Queued(raw, source, queued_at, None, str(error)))
        with self._lock:
            self._settings, self._pending = settings, pending
            self._effective = self._preview()

    # -- helpers (call with the lock held where they read state) ------------------------------------------
    def _view(self) -> QueueView:
        return QueueView(
            count=len(self._pending), bytes=sum(q.nbytes for q in self._pending), max_count=self.max_pending,
            max_bytes=self.max_pending_bytes, items=[q.view() for q in self._pending],
        )

    def _preview(self) -> SynthesisSettings:
        settings = self._settings
        for queued in self._pending:
            if queued.patch is None:
                continue
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
            raise SettingsError.from_validation(error, SETTING_NAMES) from None
        _check_names(merged, self._known)
        return merged

    def _merge_queue(
        self, settings: SynthesisSettings, queued: list[_Queued], epoch: int | None, step: int | None
    ) -> tuple[SynthesisSettings, list[SettingsChange]]:
        events: list[SettingsChange] = []
        for q in queued:
            stamp: dict[str, Any] = dict(source=q.source, queued_at=q.queued_at, epoch=epoch, step=step)
            try:
                if q.patch is None:
                    raise SettingsError([{"loc": [], "msg": q.error or "unreadable change", "type": "restored"}])
                merged = self._merge(settings, q.patch)
            except Exception as error:  # never fatal: the change is dropped, reported and kept in the history
                events.append(SettingsChange(field="*", before="", after=str(error), status="rejected", **stamp))
                continue
            for name in SETTING_NAMES:
                old, new = getattr(settings, name), getattr(merged, name)
                if old != new:
                    events.append(SettingsChange(field=name, before=describe(old), after=describe(new), **stamp))
            settings = merged
        return settings, events


def comm_rank(comm: object) -> int:
    """This process's global rank as ``comm`` tells it (``global_rank`` or ``rank``); 0 when it does not."""
    return int(getattr(comm, "global_rank", getattr(comm, "rank", 0)))


def _as_patch(patch: SettingsPatch | Mapping[str, Any]) -> SettingsPatch:
    if isinstance(patch, SettingsPatch):
        return patch
    if not isinstance(patch, Mapping):
        raise TypeError(f"`patch` must be a SettingsPatch or a mapping, got {type(patch).__name__}")
    try:
        return SettingsPatch.model_validate(dict(patch))
    except ValidationError as error:
        raise SettingsError.from_validation(error, SETTING_NAMES) from None


def _check_names(settings: SynthesisSettings, known: tuple[str, ...] | None) -> None:
    unknown = sorted(set(settings.generator_mix) - set(known)) if known is not None else []
    if unknown:
        raise SettingsError([{
            "loc": ["generator_mix"], "type": "unknown_generator",
            "msg": f"`generator_mix` names unknown generators {unknown}; known: {list(known or ())}",
        }])


def _restore_settings(
    data: dict[str, Any], current: SynthesisSettings, known: tuple[str, ...] | None
) -> tuple[SynthesisSettings, _Queued | None]:
    """Checkpointed settings; a field that no longer validates keeps its ``current`` value (reported)."""
    bad: dict[str, Any] = {}
    errors: list[str] = []
    settings = current
    for _ in range(len(data) + 1):
        try:
            settings = SynthesisSettings.model_validate(data)
            _check_names(settings, known)
            break
        except ValidationError as error:
            failure = SettingsError.from_validation(error, SETTING_NAMES)
        except SettingsError as error:
            failure = error
        fields = [f for f in failure.fields if f in data and f not in bad] or [n for n in data if n not in bad]
        bad.update({f: data[f] for f in fields})
        errors.append(str(failure))
        data = {k: getattr(current, k) if k in bad else v for k, v in data.items() if k in SETTING_NAMES}
    else:
        settings = current
    if not bad:
        return settings, None
    message = f"checkpointed settings {sorted(bad)} kept their current values: {'; '.join(errors)}"
    log.error("lightning_synth control: %s", message)
    raw = {k: v if isinstance(v, (str, int, float, bool)) or v is None else describe(v) for k, v in bad.items()}
    return settings, _Queued(raw, "checkpoint", now(), None, message)
