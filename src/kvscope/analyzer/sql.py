"""Ad-hoc SQL over loaded traces: the library side of `kvscope sql`.

By default the query runs on a locked-down connection: it reads only the part files of the
traces given (DuckDB's `enable_external_access = false` with `allowed_paths`), installs and
autoloads no extension, cannot change a setting (`lock_configuration`), and must be exactly one
read-only statement (SELECT, WITH, FROM, VALUES, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN). `unsafe=True`
(`kvscope sql --unsafe`) gives plain DuckDB, for a user's own traces on their own machine.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import duckdb

from kvscope.analyzer.load import LoadedTraces, load_traces
from kvscope.errors import UsageError
from kvscope.trace.duck import first_line, one_read_only_statement


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


def _query_error(tables: LoadedTraces, exc: duckdb.Error) -> Exception:
    """The user's query is at fault (UsageError) unless the traces' data is (TraceError)."""
    if isinstance(exc, (duckdb.OutOfMemoryException, duckdb.IOException)) or (
            type(exc) is duckdb.Error and "Protocol" in str(exc)):
        return tables.data_error(exc)
    return UsageError(f"the query failed: {first_line(exc)}")


def _relation(tables: LoadedTraces, query: str) -> duckdb.DuckDBPyRelation | None:
    try:
        return tables.con.sql(query)
    except duckdb.Error as exc:
        raise _query_error(tables, exc) from exc


def query_rows(tables: LoadedTraces, query: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Column names and rows of a query; a bad query is a UsageError (exit 2)."""
    rel = _relation(tables, query)
    if rel is None:
        return [], []
    try:
        return list(rel.columns), rel.fetchall()
    except duckdb.Error as exc:
        raise _query_error(tables, exc) from exc


def _write_parquet(tables: LoadedTraces, query: str, output: str) -> None:
    """Stream the query's result into a Parquet file (Arrow batches; DuckDB never opens `output`)."""
    import pyarrow.parquet as pq

    rel = _relation(tables, query)
    if rel is None:
        raise UsageError("the query returns no result to write.")
    try:
        reader = rel.to_arrow_reader(batch_size=65536) if hasattr(rel, "to_arrow_reader") \
            else rel.fetch_record_batch(65536)
        with pq.ParquetWriter(output, reader.schema, compression="zstd") as writer:
            for batch in reader:
                writer.write_batch(batch)
    except duckdb.Error as exc:
        raise _query_error(tables, exc) from exc
    except OSError as exc:
        raise UsageError(f"{output}: cannot write the result ({exc.strerror or exc}).") from exc


def _spark_rows(paths: Sequence[str], query: str, *, unsafe: bool, validate: bool,
                master: str | None) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Column names and rows of a user's query on Spark (translated from DuckDB SQL)."""
    from kvscope.analyzer.spark import load_spark

    with load_spark(paths, master=master, validate=validate, cache=False) as tables:
        if not unsafe:
            tables.lock_down(query)
        try:
            return tables.columns_and_rows(query)
        except tables.query_errors() as exc:
            raise UsageError(f"the query failed on Spark: {first_line(exc)}") from exc
        except Exception as exc:  # sqlglot cannot translate it
            if type(exc).__module__.startswith("sqlglot"):
                raise UsageError(f"the query cannot be translated to Spark SQL: {first_line(exc)}") from exc
            raise


def run_query(paths: Sequence[str], query: str, fmt: str, output: str | None, limit: int = 1000, *,
              unsafe: bool = False, validate: bool = True, engine: str = "duckdb",
              master: str | None = None) -> str | None:
    """Run `query` over the traces; print a table, or return CSV/JSON text, or write Parquet."""
    if engine == "spark":
        columns, rows = _spark_rows(paths, query, unsafe=unsafe, validate=validate, master=master)
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            assert output is not None
            try:
                pq.write_table(pa.Table.from_pylist([dict(zip(columns, r, strict=True)) for r in rows]), output,
                               compression="zstd")
            except OSError as exc:
                raise UsageError(f"{output}: cannot write the result ({exc.strerror or exc}).") from exc
            return None
    elif master is not None:
        raise UsageError("--master is for --engine spark only.")
    else:
        with load_traces(paths, validate=validate) as tables:
            if not unsafe:
                tables.lock_down()
                one_read_only_statement(tables.con, query)
            if fmt == "parquet":
                assert output is not None
                _write_parquet(tables, query, output)
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
    return _print_table(columns, rows, limit, output)


def _cell(v: Any) -> str:
    """A value as the table shows it: integers with thousands separators, floats rounded."""
    from kvscope.trace.text import clean

    if isinstance(v, Decimal):
        v = int(v) if v == v.to_integral_value() else float(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return clean(_plain(v))
    if isinstance(v, int):
        return f"{v:,}"
    if v != v or v in (float("inf"), float("-inf")):
        return str(v)
    if v.is_integer() and abs(v) < 1e15:
        return f"{int(v):,}"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"


def _print_table(columns: list[str], rows: list[tuple[Any, ...]], limit: int, output: str | None) -> str | None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from kvscope.trace.text import clean

    shown = rows[:limit]
    numeric = [bool(shown) and all(v is None or (isinstance(v, (int, float, Decimal)) and not isinstance(v, bool))
                                   for v in (row[i] for row in shown)) for i in range(len(columns))]
    cells = [["NULL" if v is None else _cell(v) for v in row] for row in shown]
    table = Table(show_edge=False)
    for i, (name, is_number) in enumerate(zip(columns, numeric, strict=True)):
        # numbers right-aligned and never folded; names fold only past their first 10 characters
        widest = max((len(row[i]) for row in cells), default=0) if is_number else 0
        table.add_column(Text(clean(name)), overflow="fold", justify="right" if is_number else "left",
                         min_width=max(min(len(name), 10), widest))
    for row in cells:
        table.add_row(*(Text(c) for c in row))
    if output is not None:  # the caller writes it
        buffer = io.StringIO()
        Console(file=buffer, width=200).print(table)
        return buffer.getvalue()
    console = Console()
    console.print(table)
    more = f" (first {limit} shown)" if len(rows) > limit else ""
    console.print(f"{len(rows)} row(s){more}", highlight=False)
    return None
