"""Load traces as DuckDB views and Polars lazy frames over their Parquet part files.

Nothing is read here: each table becomes a view over the part files the reader validated
(superseded parts and temporary files left out), unioned by column name so that traces of other
minor versions, and writers that wrote only the required columns, load together. A column that no
part has becomes a typed NULL, and a table that no trace has becomes an empty view with the
schema's columns, so a query never depends on which optional columns a writer chose to write.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from kvscope.errors import TraceError, UsageError
from kvscope.schema.tables import TABLES, Table
from kvscope.trace.reader import Trace, find_traces, open_trace

# DuckDB types of the schema's Arrow types.
_DUCK_TYPES: dict[str, str] = {
    "int64": "BIGINT",
    "int32": "INTEGER",
    "string": "VARCHAR",
    "bool": "BOOLEAN",
    "double": "DOUBLE",
    "binary": "BLOB",
    "timestamp[us, tz=UTC]": "TIMESTAMPTZ",
    "list<item: int64>": "BIGINT[]",
    "list<item: string>": "VARCHAR[]",
}


def duck_type(arrow_type: pa.DataType) -> str:
    """The DuckDB type name of one of the schema's Arrow types."""
    try:
        return _DUCK_TYPES[str(arrow_type)]
    except KeyError:
        raise TypeError(f"no DuckDB type for {arrow_type}") from None


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def view_sql(table: Table, files: Sequence[Path], present: set[str]) -> str:
    """The SELECT of one table's view: its schema's columns (cast), then any extra columns."""
    if not files:
        cols = ", ".join(f"CAST(NULL AS {duck_type(c.type)}) AS {c.name}" for c in table.columns)
        return f"SELECT {cols} WHERE false"
    exprs = []
    for col in table.columns:
        source = col.name if col.name in present else "NULL"
        exprs.append(f"CAST({source} AS {duck_type(col.type)}) AS {col.name}")
    extra = sorted(present - set(table.column_names))
    exprs.extend(f'"{name}"' for name in extra)
    listing = ", ".join(_sql_str(str(p)) for p in files)
    return f"SELECT {', '.join(exprs)} FROM read_parquet([{listing}], union_by_name = true)"


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)


@dataclass
class LoadedTraces:
    """Traces opened as one set of DuckDB views (one connection) and Polars lazy frames.

    Detectors read through `sql()`; derived per-layer summaries that several detectors share are
    computed once and kept as small temporary tables (`cached_table`).
    """

    traces: list[Trace]
    con: duckdb.DuckDBPyConnection
    present: dict[str, set[str]] = field(default_factory=dict)
    _cache: dict[str, str] = field(default_factory=dict)

    @property
    def paths(self) -> list[Path]:
        return [t.path for t in self.traces]

    def files(self, table: str) -> list[Path]:
        return [p.path for t in self.traces for p in t.parts.get(table, [])]

    def has_column(self, table: str, column: str) -> bool:
        """Whether at least one part of the table holds the column (otherwise the view has NULLs)."""
        return column in self.present.get(table, set())

    def num_rows(self, table: str) -> int:
        return sum(t.num_rows(table) for t in self.traces)

    def sql(self, query: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run a query and fetch every row (a DuckDB 2.x execute() must be fetched to the end)."""
        return self.con.execute(query, params or []).fetchall()

    def arrow(self, query: str) -> pa.Table:
        """Run a query and return its result as an Arrow table."""
        return self.con.sql(query).to_arrow_table()

    def records(self, query: str) -> list[dict[str, Any]]:
        """Run a query and return its rows as dictionaries (for small, aggregated results)."""
        rel = self.con.sql(query)
        names = rel.columns
        return [dict(zip(names, row, strict=True)) for row in rel.fetchall()]

    def cached_table(self, name: str, query: str) -> str:
        """Materialise `query` once as temporary table `name` and return the name."""
        if name not in self._cache:
            self.con.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS {query}").fetchall()
            self._cache[name] = query
        return name

    def lazy(self, table: str) -> Any:
        """A Polars LazyFrame over one table's parts (nothing read until collected)."""
        import polars as pl

        spec = TABLES[table]
        schema = pl.from_arrow(spec.arrow_schema().empty_table()).schema
        files = [str(p) for p in self.files(table)]
        if not files:
            return pl.LazyFrame(schema=schema)
        return pl.scan_parquet(
            files,
            schema=dict(schema),
            missing_columns="insert",
            extra_columns="ignore",
            cast_options=pl.ScanCastOptions(integer_cast="upcast", float_cast="upcast",
                                            categorical_to_string="allow"),
        )

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> LoadedTraces:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(threads: int | None = None, memory_limit: str = "1GB") -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection sized for analysis on a small machine."""
    con = duckdb.connect(":memory:")
    con.execute(f"SET threads = {threads or default_threads()}").fetchall()
    con.execute(f"SET memory_limit = {_sql_str(memory_limit)}").fetchall()
    con.execute("SET preserve_insertion_order = false").fetchall()
    return con


def load_opened(traces: list[Trace], *, threads: int | None = None, memory_limit: str = "1GB") -> LoadedTraces:
    """Create the views over already opened traces."""
    if not traces:
        raise UsageError("no traces to analyse.")
    con = connect(threads, memory_limit)
    loaded = LoadedTraces(traces, con)
    for name, table in TABLES.items():
        parts = [p for t in traces for p in t.parts.get(name, [])]
        present = {c for p in parts for c in p.column_names}
        loaded.present[name] = present
        try:
            con.execute(f"CREATE OR REPLACE VIEW {name} AS {view_sql(table, [p.path for p in parts], present)}").fetchall()
        except duckdb.Error as exc:
            raise TraceError(f"table '{name}' of {', '.join(str(t.path) for t in traces)} cannot be loaded: {exc}") from exc
    return loaded


def load_traces(paths: Sequence[str | os.PathLike[str]], *, threads: int | None = None,
                memory_limit: str = "1GB", progress: bool = False) -> LoadedTraces:
    """Open one trace, several, or folders of traces, and load them as views."""
    found = list(dict.fromkeys(p.resolve() for p in find_traces(list(paths))))  # a trace named twice counts once
    if progress and len(found) > 10:
        from rich.progress import track

        traces = [open_trace(p) for p in track(found, description="opening traces", transient=True,
                                                console=_stderr_console())]
    else:
        traces = [open_trace(p) for p in found]
    return load_opened(traces, threads=threads, memory_limit=memory_limit)


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)
