"""Typed reads of the JSON a trace carries (events.detail, run.options): someone else's trace may
hold any JSON value under any key, so detectors read it through these and get None, never a crash."""

from __future__ import annotations

import json
import math
from typing import Any


def json_object(raw: Any) -> dict[str, Any]:
    """A JSON object column's value as a dict ({} for null, invalid JSON or another JSON type)."""
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw) if isinstance(raw, str) else None
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def obj(value: Any) -> dict[str, Any]:
    """`value` if it is a JSON object, else {}."""
    return value if isinstance(value, dict) else {}


def number(value: Any) -> int | float | None:
    """A finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value if isinstance(value, int) or math.isfinite(value) else None


MAX_COUNT = (1 << 63) - 1  # what a trace's int64 columns hold; a larger byte count is not a reading


def count(value: Any) -> int | None:
    """A whole number in 0..2**63-1 (an int, or a float without a fraction), else None."""
    found = number(value)
    if found is None or not 0 <= found <= MAX_COUNT or found != int(found):
        return None
    return int(found)


def text(value: Any) -> str | None:
    """A string, else None."""
    return value if isinstance(value, str) else None
