"""Comparing results across engines: floats to 9 significant digits (sums in another order)."""

from __future__ import annotations

from typing import Any

# Traces in the synthetic fleet of the engine tests (kvscope.trace.synth_fleet).
FLEET_SIZE = 200


def rounded(x: Any) -> Any:
    """`x` with every float rounded to 9 significant digits (DuckDB and Spark aggregate in other orders)."""
    if isinstance(x, float):
        return float(f"{x:.9g}")
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [rounded(v) for v in x]
    if hasattr(x, "__dataclass_fields__"):
        import dataclasses

        return rounded(dataclasses.asdict(x))
    return x
