"""Helpers for the analyser tests: hand-written traces (only the columns given) and detector runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kvscope.analyzer import Finding, analyze, load_traces
from kvscope.analyzer.registry import get_detector, with_value
from kvscope.schema.tables import TABLES

MIB = 1 << 20


def write_part(trace: Path, table: str, columns: dict[str, list[Any]], version: str = "1.0",
               name: str = "part-000000000000.parquet") -> Path:
    """Write one part with exactly `columns` (types from the schema), as another writer would."""
    spec = TABLES[table]
    arrays = {n: pa.array(v, type=spec.column(n).type if n in spec.column_names else None)
              for n, v in columns.items()}
    data = pa.table(arrays).replace_schema_metadata({b"kvscope.format": version.encode(),
                                                     b"kvscope.table": table.encode()})
    (trace / table).mkdir(parents=True, exist_ok=True)
    path = trace / table / name
    pq.write_table(data, path)
    return path


def run_row(run_id: str = "r1", config: dict[str, Any] | None = None, layer_types: list[str] | None = None,
            dtype: str = "bfloat16", model_type: str = "llama") -> dict[str, list[Any]]:
    """The required columns of one run row."""
    import datetime as dt

    layer_types = layer_types or ["full_attention"] * 4
    return {
        "run_id": [run_id], "format_version": ["1.0"], "kvscope_version": ["hand"],
        "started_at": [dt.datetime(2026, 11, 25, tzinfo=dt.timezone.utc)], "host": ["h"],
        "torch_version": [None], "transformers_version": [None], "device": ["cuda:0"], "gpu_name": [None],
        "driver_version": [None], "model_name": ["m"], "model_type": [model_type],
        "model_config": [json.dumps(config or {})], "dtype": [dtype], "attn_implementation": ["sdpa"],
        "num_layers": [len(layer_types)], "layer_types": [layer_types], "labels": ["{}"],
    }


def layer_rows(run_id: str, gen_id: int, steps: list[int], layer: int, kv_bytes: list[int],
               stored: list[int], layer_type: str = "full_attention", dtype: str = "bfloat16",
               capacity: list[int | None] | None = None) -> dict[str, list[Any]]:
    n = len(steps)
    return {
        "run_id": [run_id] * n, "gen_id": [gen_id] * n, "step": steps, "layer": [layer] * n,
        "layer_type": [layer_type] * n, "cache_layer_class": ["DynamicLayer"] * n,
        "k_shape": [[1, 1, s, 1] for s in stored], "v_shape": [[1, 1, s, 1] for s in stored],
        "k_dtype": [dtype] * n, "v_dtype": [dtype] * n, "k_bytes": [b // 2 for b in kv_bytes],
        "v_bytes": [b - b // 2 for b in kv_bytes], "kv_bytes": kv_bytes, "aliased": [False] * n,
        "stored_tokens": stored, "capacity_tokens": capacity or [None] * n,
    }


def step_rows(run_id: str, gen_id: int, seq_len: list[int], kv_bytes: list[int], *,
              allocated: list[int | None] | None = None, reserved: list[int | None] | None = None,
              retries: list[int | None] | None = None, nvml_used: list[int | None] | None = None,
              nvml_total: int | None = None, ooms: list[int | None] | None = None,
              batch: int = 1) -> dict[str, list[Any]]:
    n = len(seq_len)
    none: list[Any] = [None] * n
    return {
        "run_id": [run_id] * n, "gen_id": [gen_id] * n, "step": list(range(n)),
        "t_ns": [1000 * (i + 1) for i in range(n)], "seq_len": seq_len, "batch_size": [batch] * n,
        "kv_bytes": kv_bytes, "allocated_bytes": allocated or none, "reserved_bytes": reserved or none,
        "active_bytes": allocated or none, "inactive_split_bytes": none, "alloc_retries": retries or none,
        "num_ooms": ooms or none, "nvml_used_bytes": nvml_used or none,
        "nvml_total_bytes": [nvml_total] * n if nvml_total is not None else none,
    }


def gen_rows(run_id: str, readings: list[dict[str, int | None]]) -> dict[str, list[Any]]:
    """Generations rows: `readings` maps e.g. 'baseline_allocated' to bytes; the rest null."""
    n = len(readings)
    cols: dict[str, list[Any]] = {
        "run_id": [run_id] * n, "gen_id": list(range(n)), "prompt_id": [f"p{i}" for i in range(n)],
        "prompt_tokens": [64] * n, "new_tokens": [256] * n, "eos_reached": [True] * n,
        "cache_class": ["DynamicCache"] * n, "started_ns": [i * 10 for i in range(n)],
        "ended_ns": [i * 10 + 5 for i in range(n)],
    }
    for point in ("baseline", "peak", "post_return", "post_release", "post_empty_cache"):
        for kind in ("allocated", "reserved", "nvml_used"):
            key = f"{point}_{kind}"
            cols[f"{key}_bytes"] = [r.get(key) for r in readings]
    return cols


def merge(*parts: dict[str, list[Any]]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for part in parts:
        for k, v in part.items():
            out.setdefault(k, []).extend(v)
    return out


def detect(path: Path | list[Path], name: str, **overrides: Any) -> list[Finding]:
    """Run one detector over a trace with some thresholds overridden."""
    det = get_detector(name)
    config = det.default_config()
    for field, value in overrides.items():
        config = with_value(config, field, value)
    paths = path if isinstance(path, list) else [path]
    with load_traces(paths) as tables:
        return analyze(tables, [det], {name: config})
