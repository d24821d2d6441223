"""The errors of :mod:`lightning_synth.control`, and the one policy they follow.

- A constructor argument of the wrong type raises ``TypeError``; of the right type but a bad value,
  ``ValueError``. The message names the argument in backticks, the rule, and what was given.
- A setting that cannot be accepted (from Python, HTTP, a config or a checkpoint) raises :class:`SettingsError`
  (a ``ValueError``) naming every bad field; over HTTP it is a 422 with the same text.
- A change queue that is full (by count or by bytes) raises :class:`QueueFullError`; over HTTP, 429.
- A server that cannot start raises :class:`ServerStartError` naming ``host:port``.
- Nothing the training loop calls at an epoch boundary raises because of a setting: a queued change that
  cannot be applied is dropped, logged at ERROR and kept in the history as ``rejected``.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

__all__ = ["QueueFullError", "ServerStartError", "SettingsError"]


class SettingsError(ValueError):
    """Invalid settings: ``str()`` names each bad field; :attr:`errors` lists them in FastAPI's form.

    Example:
        >>> from lightning_synth.control import SynthesisController
        >>> try:
        ...     SynthesisController().update(synthetic_budget=-1)
        ... except SettingsError as error:
        ...     print(error.fields)
        ['synthetic_budget']
    """

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.errors = errors
        super().__init__("Invalid synthesis settings: " + "; ".join(e["msg"] for e in errors))

    @property
    def fields(self) -> list[str]:
        """The top-level setting names at fault (``"settings"`` for a whole-object error)."""
        return sorted({str(e["loc"][0]) if e["loc"] else "settings" for e in self.errors})

    @classmethod
    def from_validation(cls, error: ValidationError, names: tuple[str, ...] = ()) -> SettingsError:
        """Messages that name the field, with the offending input shortened (it may be a 1 MB profile)."""
        errors = []
        for e in error.errors(include_url=False, include_context=False):
            field = ".".join(str(part) for part in e["loc"]) or "settings"
            if e["type"] == "extra_forbidden":
                msg = f"`{field}` is not a setting; settings are {list(names)}"
            else:
                text = e["msg"].removeprefix("Value error, ")
                got = f" (got {shorten(e.get('input'))})"
                msg = f"{text}{got}" if text.startswith("`") else f"`{field}`: {text}{got}"
            errors.append({"loc": list(e["loc"]), "msg": msg, "type": e["type"]})
        return cls(errors)


class QueueFullError(RuntimeError):
    """Too many changes, or too many bytes of changes, wait for the next epoch boundary."""


class ServerStartError(RuntimeError):
    """The control server could not bind or start; the message names ``host:port``."""


def shorten(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: safe to put into a message or a JSON response."""
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."
