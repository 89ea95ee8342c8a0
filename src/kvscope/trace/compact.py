"""`kvscope compact TRACE`: merge a trace's parts, finish interrupted compactions, remove stray files.

A recording killed before it closed leaves one part per flush (with `flush_every=1`, one per
step); readers then open thousands of files. Compaction merges each table's live parts into one
sorted part through `compact_parts`, whose every intermediate state reads the same to every
reader. Before that it completes or undoes an interrupted compaction (`repair_compaction`),
deletes stray temporary files of killed writers, and resolves parts that an older kvscope left
behind next to the part that merged them: those are dropped only when the merged part is shown
to hold each of their rows (never on the word of its `kvscope.replaces` metadata alone).
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kvscope.errors import TraceError
from kvscope.schema.tables import TABLES
from kvscope.trace.reader import Trace, _table_dir, is_trace_dir, open_trace, shown
from kvscope.trace.writer import JOURNAL_NAME, TMP_SUFFIX, compact_parts, repair_compaction

# kv_samples parts hold raw tensors: merged only while the table stays below this size.
MAX_SAMPLES_MERGE_BYTES = 1 << 30


def _scalar_columns(table: pa.Table) -> list[str]:
    return [f.name for f in table.schema if not (pa.types.is_list(f.type) or pa.types.is_large_list(f.type)
                                                   or pa.types.is_binary(f.type) or pa.types.is_dictionary(f.type))]


def _contained(leftover: Path, merged: Path) -> bool:
    """Whether every row of `leftover` is a row of `merged` (compared on their scalar columns)."""
    small, big = pq.ParquetFile(leftover).read(), pq.ParquetFile(merged).read()
    keys = [c for c in _scalar_columns(small) if c in big.column_names and small[c].null_count == 0]
    if not keys or small.num_rows > big.num_rows:
        return False
    small_keys = small.select(keys).replace_schema_metadata(None)
    big_keys = big.select(keys).replace_schema_metadata(None)
    try:
        big_keys = big_keys.cast(small_keys.schema)
        missing = small_keys.join(big_keys.group_by(keys).aggregate([]), keys, join_type="left anti")
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return False
    return missing.num_rows == 0


def _leftovers(trace: Trace, table: str) -> list[str]:
    """Parts that a part present says it merged, checked row by row; TraceError where unproven."""
    parts = {p.path.name: p for p in trace.parts.get(table, [])}
    drop: list[str] = []
    for name, part in parts.items():
        for old in (n for n in part.replaces if n != name):
            if old in parts and old not in drop:
                if not _contained(parts[old].path, part.path):
                    raise TraceError(
                        f"{shown(parts[old].path)}: part {name} says it merged this part, but not every row of it "
                        "is in that part; kvscope will not delete either (look at both before removing one)."
                    )
                drop.append(old)
    return drop


def compact_trace(path: str | os.PathLike[str]) -> list[str]:
    """Compact one trace in place; return what was done, one line each."""
    path = Path(path)
    done: list[str] = []
    if not is_trace_dir(path):
        raise TraceError(f"{shown(path)}: not a kvscope trace (no run/, steps/ or layers/ folder).")
    root = path.resolve()
    for table in TABLES:
        directory = _table_dir(path, root, table)  # refuses a table folder that links out of the trace
        if directory is None:
            continue
        outcome = repair_compaction(directory)
        if outcome:
            done.append(f"{table}: {outcome}")
        for entry in sorted(os.listdir(directory)):
            if entry.startswith(".") and (entry.endswith(TMP_SUFFIX) or entry == JOURNAL_NAME + TMP_SUFFIX):
                (directory / entry).unlink(missing_ok=True)
                done.append(f"{table}: removed stray temporary file {entry}")
    trace = open_trace(path, max_parts=None)
    for table, spec in TABLES.items():
        drop = _leftovers(trace, table)
        names = [p.path.name for p in trace.parts.get(table, []) if p.path.name not in drop]
        if table == "kv_samples" and trace.size_bytes(table) > MAX_SAMPLES_MERGE_BYTES:
            continue
        if not drop and len(names) <= 1:
            continue
        if not names:
            continue
        merged = compact_parts(path / table, spec, names, drop=drop)
        done.append(f"{table}: merged {len(names)} part(s) into {merged.name}"
                    + (f", dropped {len(drop)} part(s) it already held" if drop else ""))
    return done
