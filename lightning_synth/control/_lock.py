"""A thread lock that survives pickling (``ddp_spawn`` pickles the controller; a lock is per process)."""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["LockOwner"]


class LockOwner:
    """Gives ``self._lock`` and pickles the rest of the object without it, making a fresh lock on unpickling."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        with self._lock:
            state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
