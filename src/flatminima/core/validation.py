"""Argument validation: one set of checks for every public entry point.

Each check raises ``ValueError("Invalid <name>: <value> (expected <range>)")`` naming the argument
and the accepted range, and is called before anything is changed. Booleans are never numbers here
(``True`` is an ``int`` to Python, not a strength to us), and non-finite floats are refused.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional


def check(name: str, ok: bool, value: Any, expected: str) -> None:
    """Raise ``ValueError`` naming the argument and its accepted range unless ``ok``."""
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r} (expected {expected})")


def check_described(name: str, ok: bool, described: str, expected: str) -> None:
    """:func:`check` for values too large to print whole: ``described`` stands for the value (a
    shortened repr, a shape, a range of values)."""
    if not ok:
        raise ValueError(f"Invalid {name}: {described} (expected {expected})")


def is_real(x: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def is_int(x: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(x, int) and not isinstance(x, bool)


def check_real(name: str, value: Any) -> float:
    check(name, is_real(value), value, "a finite number")
    return float(value)


def check_nonnegative(name: str, value: Any) -> float:
    check(name, is_real(value) and value >= 0, value, "a finite float >= 0")
    return float(value)


def check_positive(name: str, value: Any) -> float:
    check(name, is_real(value) and value > 0, value, "a finite float > 0")
    return float(value)


def check_range(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
                high_open: bool = False) -> float:
    """A finite number in ``[low, high]`` (``(`` / ``)`` where open)."""
    ok = is_real(value) and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    check(name, ok, value, f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")
    return float(value)


def check_fraction(name: str, value: Any) -> float:
    """A number in ``[0, 1]`` (probabilities, mixing weights, decays)."""
    return check_range(name, value, 0.0, 1.0)


def check_int(name: str, value: Any, low: int, high: Optional[int] = None) -> int:
    ok = is_int(value) and value >= low and (high is None or value <= high)
    check(name, ok, value, f"an int >= {low}" if high is None else f"an int in [{low}, {high}]")
    return value


def check_optional_int(name: str, value: Any, low: int) -> Optional[int]:
    """``None`` (no limit: keep everything, no seed) or an int >= ``low``."""
    check(name, value is None or (is_int(value) and value >= low), value, f"None or an int >= {low}")
    return value


def check_bool(name: str, value: Any) -> bool:
    check(name, isinstance(value, bool), value, "True or False")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    choices = tuple(choices)
    # ``True == 1``: a bool matches only a bool choice.
    ok = value in choices and (not isinstance(value, bool) or any(c is value for c in choices))
    check(name, ok, value, f"one of {', '.join(map(repr, choices))}")
    return value


def check_norm(name: str, value: Any) -> float:
    """An Lp exponent ``p >= 1`` or ``'inf'`` (returned as a float, ``math.inf`` for L∞)."""
    ok = value in ("inf", math.inf) or (is_real(value) and value >= 1)
    check(name, ok, value, "a number p >= 1 or 'inf'")
    return math.inf if value in ("inf", math.inf) else float(value)
