"""DuckDB over a trace's part files, built so that nothing in a trace can change what runs.

Everything that comes from a trace (column names, file names) reaches SQL only through
`quote_ident`, `sql_str` and `glob_escape`, and every statement built here runs through
`execute_one`, which refuses a text that parses as more than one statement. `lock_down` turns a
connection into one that reads only the given files: no other file, no network, no extension
install or autoload, no configuration change.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from kvscope.errors import TraceError, UsageError

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

# DuckDB's glob treats these as wildcards, in a list element of read_parquet([...]) too.
_GLOB_CHARS = re.compile(r"([*?\[])")


def duck_type(arrow_type: pa.DataType) -> str:
    """The DuckDB type name of one of the schema's Arrow types."""
    try:
        return _DUCK_TYPES[str(arrow_type)]
    except KeyError:
        raise TypeError(f"no DuckDB type for {arrow_type}") from None


def sql_str(text: str) -> str:
    """A SQL string literal of `text`."""
    if "\x00" in text:
        raise TraceError(f"{text!r}: a NUL character cannot be passed to SQL.")
    return "'" + text.replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    """A SQL identifier of `name`: double quotes, any double quote inside doubled."""
    if "\x00" in name:
        raise TraceError(f"{name!r}: a NUL character cannot be an identifier.")
    return '"' + name.replace('"', '""') + '"'


def glob_escape(path: str) -> str:
    """`path` with DuckDB's glob characters made literal (`*` -> `[*]`, `?` -> `[?]`, `[` -> `[[]`)."""
    return _GLOB_CHARS.sub(r"[\1]", path)


def view_sql(table: Any, files: Sequence[Path], present: set[str]) -> str:
    """The SELECT of one table's view: its schema's columns (cast), then any extra columns.

    Column names are quoted identifiers and file names exact (escaped) paths, so no name in a
    trace can end the statement or widen the file list. `table` is a `kvscope.schema.tables.Table`.
    """
    if not files:
        cols = ", ".join(f"CAST(NULL AS {duck_type(c.type)}) AS {quote_ident(c.name)}" for c in table.columns)
        return f"SELECT {cols} WHERE false"
    exprs = []
    for col in table.columns:
        source = quote_ident(col.name) if col.name in present else "NULL"
        exprs.append(f"CAST({source} AS {duck_type(col.type)}) AS {quote_ident(col.name)}")
    extra = sorted(present - set(table.column_names))
    exprs.extend(quote_ident(name) for name in extra)
    return f"SELECT {', '.join(exprs)} FROM read_parquet({file_list_sql(files)}, union_by_name = true)"


def execute_one(con: Any, statement: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
    """Run exactly one statement and fetch its rows; a text that holds several is refused."""
    count = len(con.extract_statements(statement))
    if count != 1:
        raise TraceError(f"refusing to run {count} statements built from trace data (expected one).")
    return con.execute(statement, list(params or [])).fetchall()


def file_list_sql(files: Iterable[Path | str]) -> str:
    """A DuckDB list literal of exact file names (never expanded as globs)."""
    return "[" + ", ".join(sql_str(glob_escape(str(p))) for p in files) + "]"


class Scratch:
    """A private spill directory for a DuckDB connection, removed by `close()`."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="kvscope-duckdb-"))

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def connect(threads: int, memory_limit: str, scratch: Scratch | None = None) -> Any:
    """An in-memory DuckDB connection that spills only into `scratch` (or not at all)."""
    import duckdb

    con = duckdb.connect(":memory:", config={
        "threads": str(threads),
        "memory_limit": memory_limit,
        "preserve_insertion_order": "false",
        "autoinstall_known_extensions": "false",
        "autoload_known_extensions": "false",
        "temp_directory": str(scratch.path) if scratch is not None else "",
    })
    con.execute("SET enable_progress_bar = false").fetchall()  # nothing on stderr but kvscope's one-line errors
    return con


def lock_down(con: Any, files: Sequence[Path | str]) -> None:
    """Let the connection read only `files`: no other path, no network, no extension, locked settings."""
    # the escaped spelling is what DuckDB checks before it expands it to the file itself
    allowed = sorted({str(p) for p in files} | {glob_escape(str(p)) for p in files})
    con.execute("SET allowed_paths = ?", [allowed]).fetchall()
    con.execute("SET enable_external_access = false").fetchall()
    con.execute("SET allow_community_extensions = false").fetchall()
    con.execute("SET lock_configuration = true").fetchall()


# Statement types a locked-down `kvscope sql` runs; everything else (COPY, ATTACH, SET, PRAGMA,
# INSTALL/LOAD, CREATE, DROP, INSERT, CALL, ...) is refused before it runs.
READ_ONLY_TYPES = frozenset({"SELECT", "EXPLAIN"})


def one_read_only_statement(con: Any, query: str) -> str:
    """The single read-only statement of `query`, or a UsageError saying why it is refused."""
    import duckdb

    try:
        statements = con.extract_statements(query)
    except duckdb.Error as exc:
        raise UsageError(f"the query failed: {first_line(exc)}") from exc
    if len(statements) != 1:
        raise UsageError(f"kvscope sql runs exactly one statement; the query holds {len(statements)} "
                         "(use --unsafe on your own machine to run more).")
    kind = statements[0].type.name
    if kind not in READ_ONLY_TYPES:
        raise UsageError(f"kvscope sql runs only read-only queries (SELECT, WITH, FROM, VALUES, DESCRIBE, "
                         f"SHOW, SUMMARIZE, EXPLAIN), not {kind}; use --unsafe on your own machine.")
    return query


def first_line(exc: BaseException) -> str:
    """The first line of an error's message, control characters escaped and capped."""
    from kvscope.trace.text import clean

    text = str(exc).strip().splitlines()
    return clean(text[0], 400) if text else type(exc).__name__
