"""Load traces as DuckDB views and Polars lazy frames over their Parquet part files.

Nothing is read here: each table becomes a view over the part files the reader validated
(superseded parts and temporary files left out), unioned by column name so that traces of other
minor versions, and writers that wrote only the required columns, load together. A column that no
part has becomes a typed NULL, and a table that no trace has becomes an empty view with the
schema's columns, so a query never depends on which optional columns a writer chose to write.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from kvscope.errors import TraceError, UsageError
from kvscope.schema.tables import TABLES
from kvscope.trace.duck import Scratch, duck_type, execute_one, first_line, lock_down, quote_ident, view_sql
from kvscope.trace.duck import connect as duck_connect
from kvscope.trace.invariants import check_invariants
from kvscope.trace.reader import Trace, find_traces, open_trace

__all__ = ["LoadedTraces", "duck_type", "load_opened", "load_traces", "view_sql"]


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)


# DuckDB errors that a query's own text causes (a detector's bug): every other DuckDB error while
# reading traces (a damaged footer, a corrupt page, a value out of range, out of memory) is caused
# by the traces' data and becomes a TraceError (exit 2) naming them.
_QUERY_ERRORS: tuple[type[BaseException], ...] = (
    duckdb.BinderException, duckdb.CatalogException, duckdb.ParserException, duckdb.InternalException,
    duckdb.NotImplementedException,
)


@dataclass
class LoadedTraces:
    """Traces opened as one set of DuckDB views (one connection) and Polars lazy frames.

    Detectors read through `sql()`; derived per-layer summaries that several detectors share are
    computed once and kept as small temporary tables (`cached_table`). `skipped` lists the traces
    that `load_traces(..., skip_bad=True)` left out, each with the reason.
    """

    traces: list[Trace]
    con: duckdb.DuckDBPyConnection
    present: dict[str, set[str]] = field(default_factory=dict)
    _cache: dict[str, str] = field(default_factory=dict)
    scratch: Scratch | None = None
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    memory_limit: str = "1GB"
    # The engine's name and every query it ran (see kvscope.analyzer.engine.Engine).
    name: str = "duckdb"
    queries: list[str] = field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        return [t.path for t in self.traces]

    def files(self, table: str) -> list[Path]:
        return [p.path for t in self.traces for p in t.parts.get(table, [])]

    def all_files(self) -> list[Path]:
        return [p.path for t in self.traces for parts in t.parts.values() for p in parts]

    def has_column(self, table: str, column: str) -> bool:
        """Whether at least one part of the table holds the column (otherwise the view has NULLs)."""
        return column in self.present.get(table, set())

    def num_rows(self, table: str) -> int:
        return sum(t.num_rows(table) for t in self.traces)

    def data_error(self, exc: BaseException) -> TraceError:
        """The TraceError of a DuckDB error that the traces' data caused."""
        where = ", ".join(str(p) for p in self.paths[:3]) + (" ..." if len(self.paths) > 3 else "")
        if isinstance(exc, duckdb.OutOfMemoryException):
            return TraceError(f"{where}: reading the trace ran out of memory (DuckDB memory_limit "
                              f"{self.memory_limit}): {first_line(exc)}")
        return TraceError(f"{where}: the trace's data cannot be read: {first_line(exc)}")

    def sql(self, query: str, *, to: str = "arrow") -> Any:
        """Run a query; its result with column names: an Arrow table, or a Polars frame (`to="polars"`)."""
        if to not in ("arrow", "polars"):
            raise UsageError(f"to must be 'arrow' or 'polars', not {to!r}")
        table = self.arrow(query)
        if to == "polars":
            import polars as pl

            return pl.from_arrow(table)
        return table

    def rows(self, query: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run a query and fetch every row as a tuple (a DuckDB 2.x execute() must be fetched to the end)."""
        self.queries.append(query)
        try:
            return self.con.execute(query, params or []).fetchall()
        except duckdb.Error as exc:
            if isinstance(exc, _QUERY_ERRORS):
                raise
            raise self.data_error(exc) from exc

    def arrow(self, query: str) -> pa.Table:
        """Run a query and return its result as an Arrow table."""
        self.queries.append(query)
        try:
            return self.con.sql(query).to_arrow_table()
        except duckdb.Error as exc:
            if isinstance(exc, _QUERY_ERRORS):
                raise
            raise self.data_error(exc) from exc

    def records(self, query: str) -> list[dict[str, Any]]:
        """Run a query and return its rows as dictionaries (for small, aggregated results)."""
        self.queries.append(query)
        try:
            rel = self.con.sql(query)
            names = rel.columns
            return [dict(zip(names, row, strict=True)) for row in rel.fetchall()]
        except duckdb.Error as exc:
            if isinstance(exc, _QUERY_ERRORS):
                raise
            raise self.data_error(exc) from exc

    def cached_table(self, name: str, query: str) -> str:
        """Materialise `query` once as temporary table `name` and return the name."""
        if name not in self._cache:
            self.queries.append(query)
            try:
                self.con.execute(f"CREATE OR REPLACE TEMP TABLE {quote_ident(name)} AS {query}").fetchall()
            except duckdb.Error as exc:
                if isinstance(exc, _QUERY_ERRORS):
                    raise
                raise self.data_error(exc) from exc
            self._cache[name] = query
        return name

    def register_rows(self, name: str, table: pa.Table) -> str:
        """Make a small Arrow table (computed in Python) queryable as `name`: values travel as data,
        never as SQL text, so no quoting of trace strings is needed."""
        self.con.register(name, table)
        return name

    def run_traces(self) -> dict[str, str]:
        """The trace directory that holds each run_id (read from each trace's run table)."""
        return trace_of_runs(self.traces)

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
            glob=False,  # part names are exact: a '*' or '[' in a name is not a wildcard
            missing_columns="insert",
            extra_columns="ignore",
            cast_options=pl.ScanCastOptions(integer_cast="upcast", float_cast="upcast",
                                            categorical_to_string="allow"),
        )

    def lock_down(self) -> None:
        """Let the connection read only these traces' part files (see `kvscope.trace.duck.lock_down`)."""
        lock_down(self.con, self.all_files())

    def close(self) -> None:
        self.con.close()
        if self.scratch is not None:
            self.scratch.close()

    def __enter__(self) -> LoadedTraces:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(threads: int | None = None, memory_limit: str = "1GB",
            scratch: Scratch | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection sized for analysis on a small machine (no extension autoload)."""
    return duck_connect(threads or default_threads(), memory_limit, scratch)


def load_opened(traces: list[Trace], *, threads: int | None = None, memory_limit: str = "1GB") -> LoadedTraces:
    """Create the views over already opened traces."""
    if not traces:
        raise UsageError("no traces to analyse.")
    scratch = Scratch()
    con = connect(threads, memory_limit, scratch)
    loaded = LoadedTraces(traces, con, scratch=scratch, memory_limit=memory_limit)
    try:
        for name, table in TABLES.items():
            parts = [p for t in traces for p in t.parts.get(name, [])]
            present = {c for p in parts for c in p.column_names}
            loaded.present[name] = present
            try:
                execute_one(con, f"CREATE OR REPLACE VIEW {quote_ident(name)} AS "
                                 f"{view_sql(table, [p.path for p in parts], present)}")
            except duckdb.Error as exc:
                raise TraceError(f"table '{name}' of {', '.join(str(t.path) for t in traces)} cannot be loaded: "
                                 f"{first_line(exc)}") from exc
    except BaseException:
        loaded.close()
        raise
    return loaded


def open_checked(path: Path, *, validate: bool = True) -> Trace:
    """Open one trace and, with `validate`, check it as `kvscope inspect` does (TraceError if invalid)."""
    trace = open_trace(path)
    if validate:
        report = check_invariants(trace)
        if not report.ok:
            more = f" (and {len(report.errors) - 1} more problem(s); see kvscope inspect)" if len(report.errors) > 1 else ""
            raise TraceError(f"{path}: the trace breaks the format's invariants: {report.errors[0]}{more} "
                             "Use --no-validate to read it anyway.")
    return trace


def load_traces(paths: Sequence[str | os.PathLike[str]], *, threads: int | None = None,
                memory_limit: str = "1GB", progress: bool = False, validate: bool = True,
                skip_bad: bool = False) -> LoadedTraces:
    """Open one trace, several, or folders of traces, validate them and load them as views.

    `validate` runs the checks of `kvscope inspect` first (a TraceError for a trace that fails
    them). With `skip_bad`, a trace that cannot be opened or fails validation is left out and
    listed in `skipped` instead, as long as one trace is left.
    """
    found = list(dict.fromkeys(p.resolve() for p in find_traces(list(paths))))  # a trace named twice counts once
    opening: Iterable[Path] = found
    if progress and len(found) > 10:
        from rich.progress import track

        opening = track(found, description="opening traces", transient=True, console=_stderr_console())
    traces, skipped = open_all(opening, validate=validate, skip_bad=skip_bad)
    if not traces and skipped:
        raise TraceError(f"every trace is bad; the first: {skipped[0][1]}")
    loaded = load_opened(traces, threads=threads, memory_limit=memory_limit)
    loaded.skipped = skipped
    return loaded


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def trace_of_runs(traces: Iterable[Trace]) -> dict[str, str]:
    """The trace directory that holds each run_id (read from each trace's run table)."""
    out: dict[str, str] = {}
    for tr in traces:
        try:
            ids = tr.read("run", ["run_id"]).column("run_id").to_pylist()
        except Exception:  # a trace without a run table still has steps
            ids = []
        for run_id in ids:
            out.setdefault(str(run_id), str(tr.path))
    return out


def open_all(paths: Iterable[Path], *, validate: bool, skip_bad: bool) -> tuple[list[Trace], list[tuple[Path, str]]]:
    """Open (and check) each trace; with `skip_bad`, a bad one is kept as (path, reason) instead of raising."""
    traces: list[Trace] = []
    skipped: list[tuple[Path, str]] = []
    for p in paths:
        try:
            traces.append(open_checked(p, validate=validate))
        except TraceError as exc:
            if not skip_bad:
                raise
            skipped.append((p, str(exc)))
    return traces, skipped
