"""Ad-hoc SQL over loaded traces: the library side of `kvscope sql`."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

import duckdb

from kvscope.analyzer.load import LoadedTraces, load_traces
from kvscope.errors import UsageError


def _plain(x: Any) -> Any:
    if isinstance(x, (bytes, bytearray, memoryview)):
        return bytes(x).hex()
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, float) and x != x:
        return None
    return x


def query_rows(tables: LoadedTraces, query: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Column names and rows of a query; a bad query is a UsageError (exit 2)."""
    try:
        rel = tables.con.sql(query)
        if rel is None:
            return [], []
        return list(rel.columns), rel.fetchall()
    except duckdb.Error as exc:
        raise UsageError(f"the query failed: {str(exc).strip().splitlines()[0]}") from exc


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def run_query(paths: Sequence[str], query: str, fmt: str, output: str | None, limit: int = 1000) -> str | None:
    """Run `query` over the traces; print a table, or return CSV/JSON text, or write Parquet."""
    with load_traces(paths) as tables:
        if fmt == "parquet":
            assert output is not None
            try:
                tables.con.execute(f"COPY ({query.strip().rstrip(';')}) TO {_sql_str(output)} (FORMAT parquet)").fetchall()
            except duckdb.Error as exc:
                raise UsageError(f"the query failed: {str(exc).strip().splitlines()[0]}") from exc
            return None
        columns, rows = query_rows(tables, query)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([[json.dumps(_plain(v)) if isinstance(v, (list, dict)) else _plain(v) for v in row]
                          for row in rows])
        return buffer.getvalue()
    if fmt == "json":
        return json.dumps([dict(zip(columns, (_plain(v) for v in row), strict=True)) for row in rows], indent=2, default=str)
    _print_table(columns, rows, limit, output)
    return None


def _print_table(columns: list[str], rows: list[tuple[Any, ...]], limit: int, output: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_edge=False)
    for name in columns:
        table.add_column(name, overflow="fold")
    for row in rows[:limit]:
        table.add_row(*("NULL" if v is None else str(_plain(v)) for v in row))
    if output is not None:
        with open(output, "w", encoding="utf-8") as handle:
            Console(file=handle, width=200).print(table)
        return
    console = Console()
    console.print(table)
    more = f" (first {limit} shown)" if len(rows) > limit else ""
    console.print(f"{len(rows)} row(s){more}", highlight=False)
