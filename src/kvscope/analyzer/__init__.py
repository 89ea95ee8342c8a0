"""The analyser: traces as DuckDB views and Polars lazy frames, detectors, tuning and diffs.

Needs duckdb (and polars for lazy frames), never torch: it runs on any machine with the traces.
"""

from kvscope.analyzer.analyze import analyze
from kvscope.analyzer.findings import FINDING_FIELDS, SEVERITIES, Finding
from kvscope.analyzer.load import LoadedTraces, load_opened, load_traces
from kvscope.analyzer.registry import Detector, get_detector, known_names, register

__all__ = [
    "FINDING_FIELDS", "SEVERITIES", "Detector", "Finding", "LoadedTraces", "analyze", "get_detector",
    "known_names", "load_opened", "load_traces", "register",
]
