"""Flags that are known only once a recording ends, written into its run row's `options` JSON.

The run row is written when recording starts (so a crash leaves a trace with its run row); a flag
such as `cache_seen: false` (no generation showed a cache or state the recorder could find) is
merged into it at the end: the run part is rewritten under a temporary name and renamed over the
old one, so every reader sees either the old row or the new one, never both. Needs pyarrow only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kvscope.schema.tables import TABLES
from kvscope.trace.writer import PART_GLOB, TMP_SUFFIX, write_options


def merge_run_options(trace: str | Path, run_id: str, flags: dict[str, Any]) -> bool:
    """Merge `flags` into the options of run `run_id`; False when no part holds that run."""
    folder = Path(trace) / "run"
    changed = False
    for part in sorted(folder.glob(PART_GLOB)):
        data = pq.read_table(part)
        if "run_id" not in data.column_names or "options" not in data.column_names:
            continue
        ids = data["run_id"].to_pylist()
        if run_id not in ids:
            continue
        options = data["options"].to_pylist()
        for i, rid in enumerate(ids):
            if rid == run_id:
                current = json.loads(options[i]) if options[i] else {}
                current.update(flags)
                options[i] = json.dumps(current, sort_keys=True, default=str)
        index = data.column_names.index("options")
        data = data.set_column(index, data.schema.field(index), pa.array(options, data.schema.field(index).type))
        tmp = folder / f".{part.name}{TMP_SUFFIX}"
        pq.write_table(data, tmp, **write_options(TABLES["run"], data.schema))
        os.replace(tmp, part)
        changed = True
    return changed
