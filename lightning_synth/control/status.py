"""`StatusBoard`: what the training loop last published (profile, pool, sampler, weighting) and the audit history.

The loop posts with :meth:`StatusBoard.publish`; the HTTP server reads JSON-ready copies. The history of
settings changes (applied and rejected) is bounded, checkpointed, and identical on every rank.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel

from lightning_synth._validation import check_int
from lightning_synth.control._lock import LockOwner
from lightning_synth.control.queue import SettingsChange, now

__all__ = ["STATUS_SECTIONS", "StatusBoard"]

STATUS_SECTIONS: tuple[str, ...] = ("profile", "pool", "sampler", "weighting")


class StatusBoard(LockOwner):
    """The last published state of each part of the loop, and the last ``max_history`` settings changes.

    Args:
        max_history: how many change events to keep (and checkpoint).

    Raises:
        TypeError: ``max_history`` is not an int.
        ValueError: ``max_history < 1``.

    Example:
        >>> board = StatusBoard()
        >>> board.publish(pool={"size": 12}, epoch=3)
        >>> board.section("pool")["data"]
        {'size': 12}
    """

    def __init__(self, max_history: int = 1000) -> None:
        check_int("max_history", max_history, 1)
        super().__init__()
        self._history: deque[SettingsChange] = deque(maxlen=max_history)
        self._sections: dict[str, dict[str, Any]] = {}

    def publish(
        self,
        *,
        profile: BaseModel | Mapping[str, Any] | None = None,
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
            name: {"epoch": epoch, "updated_at": now(), "data": _json_safe(value, name)}
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

    def record(self, events: Iterable[SettingsChange]) -> None:
        """Append change events to the history (the oldest fall off past ``max_history``)."""
        with self._lock:
            self._history.extend(events)

    @property
    def history(self) -> list[SettingsChange]:
        with self._lock:
            return list(self._history)

    def snapshot(self, history: int = 20) -> dict[str, Any]:
        """The last ``history`` changes and every section, JSON-ready."""
        with self._lock:
            recent = list(self._history)[-history:] if history > 0 else []
            return json.loads(json.dumps({
                "history": [e.model_dump() for e in recent],
                "sections": {name: self._sections.get(name) for name in STATUS_SECTIONS},
            }))

    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"history": [e.model_dump() for e in self._history]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if "history" not in state_dict:
            raise KeyError(f"`state_dict` lacks ['history']; it has {sorted(state_dict)}")
        history = [SettingsChange.model_validate(e) for e in state_dict["history"]]
        with self._lock:
            self._history.clear()
            self._history.extend(history)


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
