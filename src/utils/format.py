"""Numbers as text: the one set of formatters of the console, the plots and the report.

Missing values print as "—"; non-finite ones as inf, -inf or nan; magnitudes of 1e5 and more
(and, for ``sig``, non-zero ones below 1e-3) switch to scientific notation.
"""
from __future__ import annotations

import math

MISSING = "—"


def is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _special(value) -> str | None:
    """The text of a missing, non-numeric or non-finite value; None for a finite number."""
    if value is None:
        return MISSING
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return None


def fixed(value, places: int = 3) -> str:
    """Fixed decimals (an int as it is), e.g. 33.893; 1.905e+06 from 1e5 on."""
    special = _special(value)
    if special is not None:
        return special
    if isinstance(value, int):
        return str(value)
    return f"{value:.{places}f}" if abs(value) < 1e5 else f"{value:.3e}"


def sig(value, digits: int = 4) -> str:
    """Significant digits, e.g. 0.1234; 1.23e-04 and 1.23e+05 outside [1e-3, 1e5)."""
    special = _special(value)
    if special is not None:
        return special
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.{max(digits - 1, 1)}e}"
    return f"{value:.{digits}g}"


def ppl(value) -> str:
    """A perplexity with two decimals (scientific from 1e5 on)."""
    return fixed(value, 2)


def pct(value: float, signed: bool = False) -> str:
    """A share or relative change (0.05 = 5%) as a percentage with sensible precision; the
    magnitude only, unless ``signed``."""
    if value is None or math.isnan(value):
        return "nan"
    sign = "-" if signed and value < 0 else ""
    if math.isinf(value):
        return f"{sign}inf%"
    magnitude = abs(value) * 100
    if magnitude < 0.01:
        return "<0.01%"
    return f"{sign}{magnitude:.2f}%" if magnitude < 10 else f"{sign}{magnitude:.3g}%"


def times(value: float) -> str:
    """A ratio as "3.91x" (four decimals near 1, where three digits would read "1x")."""
    special = _special(value)
    if special is not None:
        return "inf (overflow)" if special == "inf" else special
    if abs(value - 1) < 0.01:
        return f"{value:.4f}x"
    return f"{value:.3g}x" if value < 1e4 else f"{value:.3e}x"


def count(n: int) -> str:
    """A count of weights: 884.7k, 134.5M, 8.0B."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
