"""Append rows to a trace and flush them as Parquet part files, atomically.

A part is written as `.<name>.tmp` and renamed into place, so readers (and `read_parquet` globs)
never see a half-written file and a process killed at any instant leaves every finished part
readable. `compact()` merges a table's parts into one sorted part; it lists the parts it replaces
in its metadata before deleting them, so a crash in between double-counts nothing.
Needs only pyarrow: the recorder runs on GPU hosts without polars or duckdb.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kvscope.errors import TraceError
from kvscope.schema.tables import META_REPLACES, TABLES, Table

PART_GLOB = "part-*.parquet"
ZSTD_LEVEL = 9
# Sampled tensors barely compress and can be large: merging them would only cost memory.
NOT_COMPACTED = frozenset({"kv_samples"})


def write_options(table: Table, schema: pa.Schema) -> dict[str, Any]:
    """Parquet writer options: zstd, delta encoding for monotonic integers, dictionaries elsewhere."""
    delta = [c.name for c in table.columns if c.encoding == "delta" and c.name in schema.names]
    dictionary = [n for n in schema.names if n not in delta]
    return {
        "compression": "zstd",
        "compression_level": ZSTD_LEVEL,
        "use_dictionary": dictionary,
        "column_encoding": {n: "DELTA_BINARY_PACKED" for n in delta},
        "write_statistics": True,
    }


def write_part(directory: Path, table: Table, data: pa.Table, *, replaces: Sequence[str] = ()) -> Path:
    """Write one part file atomically (temporary name, then rename) and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"part-{uuid.uuid4().hex[:12]}.parquet"
    metadata = dict(data.schema.metadata or {})
    metadata.update(table.arrow_schema().metadata)
    if replaces:
        metadata[META_REPLACES] = ",".join(replaces).encode()
    data = data.replace_schema_metadata(metadata)
    tmp = directory / f".{name}.tmp"
    pq.write_table(data, tmp, **write_options(table, data.schema))
    os.replace(tmp, directory / name)
    return directory / name


def conform(table_name: str, data: pa.Table) -> pa.Table:
    """`data` with the table's columns in order and types (missing optional columns as nulls)."""
    if table_name not in TABLES:
        raise TraceError(f"unknown trace table {table_name!r}; tables are {', '.join(TABLES)}")
    table = TABLES[table_name]
    try:
        arrays = [
            data[c.name].cast(c.type) if c.name in data.column_names else pa.nulls(len(data), c.type)
            for c in table.columns
        ]
        return pa.Table.from_arrays(arrays, schema=table.arrow_schema())
    except pa.ArrowException as exc:  # invalid values or an impossible cast
        raise TraceError(f"rows for table {table_name!r} do not match its schema: {exc}") from exc


class TraceWriter:
    """Buffers rows per table and writes them as part files of a trace directory.

    Rows are buffered column-wise (a list per column), which is the cheapest way to append from a
    hot path. Unknown tables or columns raise at once, so a typo never silently drops data.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise TraceError(f"cannot write a trace to {self.path}: it exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        self._buffers: dict[str, dict[str, list[Any]]] = {}
        self._arrow_buffers: dict[str, list[pa.Table]] = {}
        self._parts_written: dict[str, list[str]] = {}

    def _buffer(self, table_name: str) -> dict[str, list[Any]]:
        buffer = self._buffers.get(table_name)
        if buffer is None:
            if table_name not in TABLES:
                raise TraceError(f"unknown trace table {table_name!r}; tables are {', '.join(TABLES)}")
            buffer = {name: [] for name in TABLES[table_name].column_names}
            self._buffers[table_name] = buffer
        return buffer

    def append(self, table_name: str, row: Mapping[str, Any]) -> None:
        """Add one row; columns missing from `row` become null."""
        buffer = self._buffer(table_name)
        unknown = set(row) - buffer.keys()
        if unknown:
            raise TraceError(f"table {table_name!r} has no column(s) {', '.join(sorted(unknown))}")
        for name, values in buffer.items():
            values.append(row.get(name))

    def extend(self, table_name: str, columns: Mapping[str, Sequence[Any]]) -> None:
        """Add many rows given column-wise; all sequences must have the same length."""
        buffer = self._buffer(table_name)
        unknown = set(columns) - buffer.keys()
        if unknown:
            raise TraceError(f"table {table_name!r} has no column(s) {', '.join(sorted(unknown))}")
        lengths = {len(v) for v in columns.values()}
        if len(lengths) > 1:
            raise TraceError(f"columns given for table {table_name!r} have different lengths {sorted(lengths)}")
        n = lengths.pop() if lengths else 0
        for name, values in buffer.items():
            given = columns.get(name)
            values.extend(given if given is not None else [None] * n)

    def write_table(self, table_name: str, data: pa.Table) -> Path:
        """Write an already built (and, for compression, already sorted) table as one part."""
        return write_part(self.path / table_name, TABLES[table_name], conform(table_name, data))

    def extend_arrow(self, table_name: str, data: pa.Table) -> None:
        """Buffer rows given as an Arrow table (built vectorised); written with the next flush."""
        self._arrow_buffers.setdefault(table_name, []).append(conform(table_name, data))

    def pending_rows(self, table_name: str) -> int:
        buffer = self._buffers.get(table_name)
        listed = len(next(iter(buffer.values()))) if buffer else 0
        return listed + sum(len(t) for t in self._arrow_buffers.get(table_name, []))

    def flush(self) -> list[Path]:
        """Write every non-empty buffer as a new part file; return the paths written."""
        written = []
        for table_name in list(self._buffers.keys() | self._arrow_buffers.keys()):
            table = TABLES[table_name]
            chunks = self._arrow_buffers.pop(table_name, [])
            buffer = self._buffers.get(table_name)
            if buffer and next(iter(buffer.values())):
                chunks.insert(0, pa.Table.from_pydict(buffer, schema=table.arrow_schema()))
                for values in buffer.values():
                    values.clear()
            if not chunks:
                continue
            data = chunks[0] if len(chunks) == 1 else pa.concat_tables(chunks)
            path = write_part(self.path / table_name, table, data)
            written.append(path)
            self._parts_written.setdefault(table_name, []).append(path.name)
        return written

    def compact(self, tables: Iterable[str] | None = None) -> None:
        """Merge the parts this writer wrote into one sorted part per table."""
        for table_name in list(tables if tables is not None else self._parts_written):
            names = self._parts_written.get(table_name, [])
            table = TABLES[table_name]
            if table_name in NOT_COMPACTED or not names or (len(names) == 1 and not table.sort_keys):
                continue
            directory = self.path / table_name
            data = pa.concat_tables(pq.read_table(directory / n) for n in names)
            if table.sort_keys:
                data = data.sort_by([(k, "ascending") for k in table.sort_keys])
            merged = write_part(directory, table, data, replaces=names)
            for name in names:
                (directory / name).unlink(missing_ok=True)
            self._parts_written[table_name] = [merged.name]

    def close(self, *, compact: bool = True) -> None:
        """Flush what is buffered and, by default, compact each table into one sorted part."""
        self.flush()
        if compact:
            self.compact()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
