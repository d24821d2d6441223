"""Argument checks shared by the public classes: the error names the argument, the rule and the value."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = ["check_bool", "check_choice", "check_int", "check_number"]


def check_bool(name: str, value: Any) -> None:
    """Raise ``TypeError`` unless ``value`` is a bool.

    Example:
        >>> check_bool("sequential", True)
        >>> check_bool("sequential", 1)
        Traceback (most recent call last):
        ...
        TypeError: `sequential` must be a bool, got int: 1
    """
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {type(value).__name__}: {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``.

    Example:
        >>> check_choice("eviction", "oldest", ("oldest", "random"))
        >>> check_choice("eviction", "newest", ("oldest", "random"))
        Traceback (most recent call last):
        ...
        ValueError: `eviction` must be one of ('oldest', 'random'), got 'newest'
    """
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}")


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


def check_number(
    name: str, value: Any, low: float | None = None, high: float | None = None, low_open: bool = False
) -> None:
    """Raise ``TypeError`` unless ``value`` is a real number (not a bool), ``ValueError`` unless it is finite
    and inside ``[low, high]`` (``(low, high]`` with ``low_open``).

    Example:
        >>> check_number("share", 0.5, low=0.0, high=1.0)
        >>> check_number("share", 0.0, low=0.0, high=1.0, low_open=True)
        Traceback (most recent call last):
        ...
        ValueError: `share` must be in (0.0, 1.0], got 0.0
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}: {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if not math.isfinite(value) or too_low or too_high:
        left = "(" if low_open else "["
        raise ValueError(f"`{name}` must be in {left}{low}, {high}], got {value!r}")
