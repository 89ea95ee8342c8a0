"""`inspect_trace`: what a trace holds, how big it is, and whether it is valid."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from kvscope.errors import TraceError
from kvscope.schema.tables import TABLES
from kvscope.trace.invariants import MAX_JSON_CHARS, check_invariants
from kvscope.trace.reader import Trace, open_trace

RUN_FIELDS = (
    "run_id", "model_name", "model_type", "num_layers", "dtype", "device", "gpu_name", "driver_version",
    "torch_version", "transformers_version", "attn_implementation", "kvscope_version", "format_version",
    "started_at", "host", "tokenizer",
)


# Longest string of a run field kept in the report (a hostile 100 MiB model name is cut here).
MAX_FIELD_CHARS = 10_000


def _cap(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
        return value[:MAX_FIELD_CHARS] + f"... ({len(value) - MAX_FIELD_CHARS:,} more characters)"
    return value


def _instant(raw: Any) -> str | None:
    """An ISO instant from microseconds since the epoch; out-of-range values are shown as numbers."""
    if raw is None:
        return None
    try:
        return (datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=int(raw))).isoformat()
    except (OverflowError, ValueError):
        return f"{raw} us since 1970 (out of range)"


def _run_rows(trace: Trace) -> list[dict[str, Any]]:
    columns = [f for f in RUN_FIELDS if trace.has_column("run", f)] + (
        ["labels"] if trace.has_column("run", "labels") else [])
    data = trace.read("run", columns)
    if "started_at" in data.column_names:  # read as numbers: an out-of-range instant must not raise
        index = data.column_names.index("started_at")
        data = data.set_column(index, "started_at", pc.cast(data["started_at"].cast(pa.timestamp("us")), pa.int64()))
    runs = []
    for batch in data.to_batches(max_chunksize=1024):
        for row in batch.to_pylist():
            if "started_at" in row:
                row["started_at"] = _instant(row["started_at"])
            labels = row.get("labels")
            if isinstance(labels, str) and len(labels) <= MAX_JSON_CHARS:
                try:
                    row["labels"] = json.loads(labels, parse_constant=lambda name: name)
                except (ValueError, RecursionError):
                    pass
            runs.append({k: _cap(v) for k, v in row.items()})
    return runs


def no_cache_notes(trace: Trace) -> list[str]:
    """One note per run whose recorder saw no cache (`options.cache_seen = false`): its 0 bytes and
    missing layer rows say nothing about the model's memory."""
    if not trace.has_column("run", "options"):
        return []
    notes = []
    for row in trace.read("run", ["run_id", "options"]).to_pylist():
        raw = row.get("options")
        if not isinstance(raw, str) or len(raw) > MAX_JSON_CHARS or '"cache_seen"' not in raw:
            continue
        try:
            options = json.loads(raw, parse_constant=lambda name: name)
        except (ValueError, RecursionError):
            continue
        if isinstance(options, dict) and options.get("cache_seen") is False:
            gens = options.get("cache_not_seen_generations")
            which = f" (generations {_cap(json.dumps(gens))})" if isinstance(gens, list) else ""
            notes.append(f"run {_cap(str(row.get('run_id')))}: no cache seen{which}: the recorder found no KV cache "
                         "or recurrent state it can read, so these generations have no layer rows and 0 KV bytes; "
                         "this says nothing about the model's memory.")
    return notes


def inspect_trace(path: str | Path) -> dict[str, Any]:
    """A JSON-ready report of one trace. Raises TraceError when the trace is structurally invalid."""
    trace = open_trace(path)
    report = check_invariants(trace)
    try:
        runs = _run_rows(trace)
    except TraceError:  # a run part that cannot be decoded: the report's errors say so
        runs = []
    tables = {}
    for name in TABLES:
        rows, size = trace.num_rows(name), trace.size_bytes(name)
        tables[name] = {
            "rows": rows,
            "parts": len(trace.parts.get(name, [])),
            "size_bytes": size,
            "bytes_per_row": round(size / rows, 3) if rows else None,
        }
    return {
        "path": str(trace.path),
        "format_versions": trace.format_versions,
        "runs": runs,
        "generations": trace.num_rows("generations"),
        "tables": tables,
        "size_bytes": sum(t["size_bytes"] for t in tables.values()),
        "valid": report.ok,
        "errors": report.errors,
        "warnings": report.warnings + (no_cache_notes(trace) if report.ok else []),
    }
