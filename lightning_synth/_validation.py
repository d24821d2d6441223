"""Argument checks shared by the public classes: the error names the argument, the rule and the value."""

from __future__ import annotations

from typing import Any

__all__ = ["check_int"]


def check_int(name: str, value: Any, minimum: int) -> None:
    """Raise ``TypeError`` unless ``value`` is an int (not a bool), ``ValueError`` unless it is ``>= minimum``.

    Example:
        >>> check_int("steps", 3, 0)
        >>> check_int("steps", -1, 0)
        Traceback (most recent call last):
        ...
        ValueError: `steps` must be >= 0, got -1
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}: {value!r}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
