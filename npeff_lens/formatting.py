"""Numbers written for people: the terminal tables, the report's pages and ``npeff explain``'s view.

>>> fmt(0.0123456), fmt(0.0123456, 4), fmt(None), fmt(float("nan"), missing=""), fmt(True), fmt(12)
('0.0123', '0.01235', '–', '', 'yes', '12')
>>> pct(0.1234), pct(None)
('12.3%', '–')

None, NaN and ±inf are all "no number" here (strict JSON stores them as ``null``): each caller says how such a
value reads with ``missing``.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

__all__ = ["MISSING", "fmt", "pct"]

MISSING = "–"  # an absent or undefined value: None, NaN, ±inf


def _undefined(value) -> bool:
    return value is None or (isinstance(value, Real) and not math.isfinite(value))


def fmt(value, digits: int = 3, missing: str = MISSING) -> str:
    """``value`` for display: a float to ``digits`` significant digits, a bool as yes / no, None / NaN / ±inf as
    ``missing``, anything else as ``str``."""
    if _undefined(value):
        return missing
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Real) and not isinstance(value, Integral):  # float, numpy floats
        return f"{value:.{digits}g}"
    return str(value)


def pct(value, digits: int = 1, missing: str = MISSING) -> str:
    """A fraction as a percentage with ``digits`` decimals (``0.1234`` -> ``12.3%``); None / NaN / ±inf as
    ``missing``."""
    return missing if _undefined(value) else f"{100 * value:.{digits}f}%"
