"""Comparing results across engines: floats to 9 significant digits (sums in another order)."""

from __future__ import annotations

from kvscope.analyzer.engine import rounded  # noqa: F401 - the comparison the tests use

# Traces in the synthetic fleet of the engine tests (kvscope.trace.synth_fleet).
FLEET_SIZE = 200


