"""`inspect_trace`: what a trace holds, how big it is, and whether it is valid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvscope.schema.tables import TABLES
from kvscope.trace.reader import check_invariants, open_trace

RUN_FIELDS = (
    "run_id", "model_name", "model_type", "num_layers", "dtype", "device", "gpu_name", "driver_version",
    "torch_version", "transformers_version", "attn_implementation", "kvscope_version", "format_version",
    "started_at", "host", "tokenizer",
)


def inspect_trace(path: str | Path) -> dict[str, Any]:
    """A JSON-ready report of one trace. Raises TraceError when the trace is structurally invalid."""
    trace = open_trace(path)
    columns = [f for f in RUN_FIELDS if trace.has_column("run", f)] + (
        ["labels"] if trace.has_column("run", "labels") else [])
    runs = []
    for row in trace.read("run", columns).to_pylist():
        if row.get("started_at") is not None:
            row["started_at"] = row["started_at"].isoformat()
        if isinstance(row.get("labels"), str):
            try:
                row["labels"] = json.loads(row["labels"])
            except json.JSONDecodeError:
                pass
        runs.append(row)
    tables = {}
    for name in TABLES:
        rows, size = trace.num_rows(name), trace.size_bytes(name)
        tables[name] = {
            "rows": rows,
            "parts": len(trace.parts.get(name, [])),
            "size_bytes": size,
            "bytes_per_row": round(size / rows, 3) if rows else None,
        }
    report = check_invariants(trace)
    return {
        "path": str(trace.path),
        "format_versions": trace.format_versions,
        "runs": runs,
        "generations": trace.num_rows("generations"),
        "tables": tables,
        "size_bytes": sum(t["size_bytes"] for t in tables.values()),
        "valid": report.ok,
        "errors": report.errors,
        "warnings": report.warnings,
    }
