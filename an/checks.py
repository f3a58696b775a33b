"""Argument checks and did-you-mean hints, shared by every package (the lowest layer, so all can import it).

Each check returns the value (converted where that is lossless) or raises ``ValueError`` with a message that
names the owner (a layer, a model) and the argument, so a bad value fails where it enters, in one place.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

__all__ = ["check_choice", "check_flag", "check_int", "check_number", "check_rate", "did_you_mean"]


def did_you_mean(word: Any, choices: Iterable[Any]) -> str:
    """``" Did you mean 'x'?"`` for the closest of ``choices`` (ignoring case), or ``""`` when none is close."""
    by_lower = {str(c).lower(): str(c) for c in choices}
    close = difflib.get_close_matches(str(word).lower(), list(by_lower), n=1, cutoff=0.6)
    return f" Did you mean '{by_lower[close[0]]}'?" if close else ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(owner: str, name: str, value: Any, minimum: int = 1) -> int:
    """``value`` if it is an integer >= ``minimum``."""
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{owner}: '{name}' must be an integer >= {minimum}, got {value!r}")
    return value


def check_number(owner: str, name: str, value: Any, low: float, high: float | None = None, *, low_open=False) -> float:
    """``value`` as a float if it is a number in ``[low, high)`` (``(low, high)`` with ``low_open``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value < high)
    if not ok:
        lo = "(" if low_open else "["
        rng = f"{lo}{low}, {high})" if high is not None else f"{lo}{low}, inf)"
        raise ValueError(f"{owner}: '{name}' must be a number in {rng}, got {value!r}")
    return float(value)


def check_rate(owner: str, name: str, value: Any) -> float:
    """``value`` as a float if it is a probability in ``[0, 1)`` (dropout rates)."""
    return check_number(owner, name, value, 0.0, 1.0)


def check_flag(owner: str, name: str, value: Any) -> bool:
    """``value`` if it is a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: '{name}' must be True or False, got {value!r}")
    return value


def check_choice(owner: str, name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices`` (the message lists them, with a did-you-mean)."""
    choices = tuple(choices)
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{owner}: '{name}' must be one of {listed}, got {value!r}.{did_you_mean(value, choices)}")
    return value
