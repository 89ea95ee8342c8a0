"""The Spark engine: the same measure SQL over the same Parquet parts, on a Spark session.

`load_spark(paths, master=...)` opens traces as Spark temporary views named like DuckDB's (`run`,
`generations`, `steps`, `layers`, ...), each read with the schema's columns (a column that no part
has reads as NULL, as on DuckDB). Local paths go through the same reader and validation as DuckDB
(the exact part files, superseded parts left out); a URI the session's filesystem reads
(`s3a://bucket/fleet/host-1`, `hdfs://...`, globs allowed) is read as `<uri>/<table>/part-*.parquet`.
Queries are written in DuckDB's dialect and translated to Spark SQL by sqlglot; the cluster runs
the scans and aggregations, and only the aggregated rows that a query selects come back to the
driver, where the detectors' judges run. Needs `pip install kvscope[spark]` and a JVM (Java 17).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa

from kvscope.errors import TraceError, UsageError
from kvscope.schema.tables import TABLES
from kvscope.trace.reader import Trace, find_traces

# Functions a user's query may not call on Spark without --unsafe: they reach the JVM or files.
_UNSAFE_FUNCTIONS = {"reflect", "java_method", "try_reflect", "read_files", "input_file_name"}
_GLOB = str.maketrans({c: f"\\{c}" for c in "{}[]*?\\"})


def _import_pyspark() -> Any:
    try:
        import pyspark.sql
    except ImportError as exc:
        raise UsageError("--engine spark needs pyspark: pip install 'kvscope[spark]' (and a Java 17 runtime).") from exc
    return pyspark.sql


def spark_session(master: str | None = None, app_name: str = "kvscope") -> Any:
    """The active Spark session, or a new one at `master` (default local[*]) set up for analysis:
    no UI, DuckDB's NULL-on-error arithmetic (ANSI off), UTC, and no SQL on raw files."""
    sql = _import_pyspark()
    # pyspark logs every failed query on stderr; kvscope reports it once, as one line
    logging.getLogger("SQLQueryContextLogger").setLevel(logging.CRITICAL)
    active = sql.SparkSession.getActiveSession()
    if active is not None:
        return active
    master = master or "local[*]"
    if master.startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    builder = (sql.SparkSession.builder.master(master).appName(app_name)
               .config("spark.ui.enabled", "false")
               .config("spark.sql.ansi.enabled", "false")
               .config("spark.sql.session.timeZone", "UTC")
               .config("spark.sql.runSQLOnFiles", "false")
               .config("spark.ui.showConsoleProgress", "false"))
    if master.startswith("local"):  # small shuffles: a few partitions, not 200
        builder = builder.config("spark.sql.shuffle.partitions", str(max(os.cpu_count() or 1, 2)))
    try:
        session = builder.getOrCreate()
    except Exception as exc:  # no JVM, a master that cannot be reached
        raise UsageError(f"cannot start Spark at {master}: {str(exc).splitlines()[0] if str(exc) else exc}") from exc
    session.sparkContext.setLogLevel("ERROR")
    return session


@functools.lru_cache(maxsize=512)
def to_spark(query: str) -> str:
    """A DuckDB query in Spark SQL (sqlglot)."""
    import sqlglot

    return sqlglot.transpile(query, read="duckdb", write="spark")[0]


def _spark_schema(name: str) -> Any:
    from pyspark.sql.pandas.types import from_arrow_schema
    from pyspark.sql.types import StructField, StructType

    schema = from_arrow_schema(TABLES[name].arrow_schema())
    return StructType([StructField(f.name, f.dataType, True) for f in schema.fields])


def _plain(value: Any) -> Any:
    """Collected values as DuckDB returns them: Rows as dicts, Decimals as floats."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, Decimal):
        return float(value)
    return value


def _is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


@dataclass
class SparkTraces:
    """Traces as temporary views of a Spark session (see `kvscope.analyzer.engine.Engine`)."""

    session: Any
    traces: list[Trace]
    uris: list[str]
    name: str = "spark"
    queries: list[str] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    _cached: dict[str, Any] = field(default_factory=dict)
    _cached_views: list[Any] = field(default_factory=list)

    @property
    def paths(self) -> list[str]:
        return [str(t.path) for t in self.traces] + self.uris

    def query_errors(self) -> tuple[type[BaseException], ...]:
        from pyspark.errors import AnalysisException, ParseException

        return AnalysisException, ParseException

    def dataframe(self, query: str) -> Any:
        """The Spark DataFrame of a DuckDB-dialect query (nothing runs until collected)."""
        return self.session.sql(to_spark(query))

    def _collect(self, df: Any) -> list[dict[str, Any]]:
        try:
            return [_plain(row.asDict(recursive=True)) for row in df.collect()]
        except self.query_errors():
            raise
        except Exception as exc:  # a damaged part, a file that went away, an executor lost
            raise self.data_error(exc) from exc

    def data_error(self, exc: BaseException) -> TraceError:
        where = ", ".join(self.paths[:3]) + (" ..." if len(self.paths) > 3 else "")
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return TraceError(f"{where}: the trace's data cannot be read on Spark: {text[:300]}")

    def records(self, query: str) -> list[dict[str, Any]]:
        self.queries.append(query)
        return self._collect(self.dataframe(query))

    def columns_and_rows(self, query: str) -> tuple[list[str], list[tuple[Any, ...]]]:
        """A user's query (`kvscope sql --engine spark`): column names and rows."""
        self.queries.append(query)
        df = self.dataframe(query)
        return list(df.columns), [tuple(r[c] for c in df.columns) for r in self._collect(df)]

    def cached_table(self, name: str, query: str) -> str:
        if name not in self._cached:
            self.queries.append(query)
            df = self.dataframe(query).cache()
            df.createOrReplaceTempView(name)
            self._cached[name] = df
        return name

    def register_rows(self, name: str, table: pa.Table) -> str:
        from pyspark.sql.pandas.types import from_arrow_schema

        schema = from_arrow_schema(table.schema)
        rows = table.to_pylist()
        self.session.createDataFrame([tuple(r.values()) for r in rows], schema).createOrReplaceTempView(name)
        return name

    def num_rows(self, table: str) -> int:
        if not self.uris:
            return sum(t.num_rows(table) for t in self.traces)
        (row,) = self.records(f"SELECT count(*) AS n FROM {table}")
        return int(row["n"])

    def run_traces(self) -> dict[str, str]:
        from kvscope.analyzer.load import trace_of_runs

        out = trace_of_runs(self.traces)
        if self.uris:
            from pyspark.sql.functions import input_file_name

            df = self.session.table("run").select("run_id", input_file_name().alias("file")).distinct()
            for r in self._collect(df):
                out.setdefault(str(r["run_id"]), r["file"].rsplit("/", 3)[0])
        return out

    def lock_down(self, query: str) -> None:
        """Refuse anything but one read-only query over the trace views (kvscope sql without --unsafe)."""
        import sqlglot
        from sqlglot import exp

        try:
            statements = [s for s in sqlglot.parse(query, read="duckdb") if s is not None]
        except sqlglot.errors.ParseError as exc:
            raise UsageError(f"the query failed: {str(exc).splitlines()[0]}") from exc
        if len(statements) != 1 or not isinstance(statements[0], exp.Query):
            raise UsageError("give exactly one read-only query (SELECT or WITH ... SELECT); --unsafe lifts this.")
        tree = statements[0]
        ctes = {c.alias_or_name.lower() for c in tree.find_all(exp.CTE)}
        for table in tree.find_all(exp.Table):
            if table.name.lower() not in set(TABLES) | ctes or table.args.get("db") or table.args.get("catalog"):
                raise UsageError(f"the query may read only the trace views ({', '.join(TABLES)}), not "
                                 f"{table.sql()!r}; --unsafe lifts this.")
        for func in tree.find_all(exp.Func):
            name = (func.name if isinstance(func, exp.Anonymous) else func.sql_name()).lower()
            if name in _UNSAFE_FUNCTIONS:
                raise UsageError(f"the query may not call {name}() on Spark; --unsafe lifts this.")

    def close(self) -> None:
        for df in [*self._cached.values(), *self._cached_views]:
            df.unpersist()
        self._cached.clear()
        self._cached_views.clear()
        for name in list(TABLES):
            self.session.catalog.dropTempView(name)

    def __enter__(self) -> SparkTraces:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read(session: Any, table: str, files: list[str]) -> Any:
    schema = _spark_schema(table)
    if not files:
        return session.createDataFrame([], schema)
    return session.read.schema(schema).parquet(*files)


def load_spark(paths: Sequence[str | os.PathLike[str]], *, master: str | None = None, validate: bool = True,
               skip_bad: bool = False, cache: bool = True) -> SparkTraces:
    """Open traces (local paths and/or URIs) as Spark views; see the module's docstring.

    `cache`: each view is cached (memory, then disk) as its first query reads it, so the detectors'
    few dozen queries read the Parquet parts once (a 200-trace fleet on local[2]: 43 s of queries
    without, 21 s with); one query (`kvscope sql`) reads only what it selects without it."""
    from kvscope.analyzer.load import open_all

    given = [str(p) for p in paths]
    uris = [p for p in given if _is_uri(p)]
    local = [p for p in given if not _is_uri(p)]
    traces: list[Trace] = []
    skipped: list[tuple[Path, str]] = []
    if local:
        found = dict.fromkeys(q.resolve() for q in find_traces([q.removeprefix("file://") for q in local]))
        traces, skipped = open_all(found, validate=validate, skip_bad=skip_bad)
        if not traces and not uris and skipped:
            raise TraceError(f"every trace is bad; the first: {skipped[0][1]}")
    if not traces and not uris:
        raise UsageError("no traces to analyse.")
    session = spark_session(master)
    engine = SparkTraces(session, traces, uris, skipped=skipped)
    for table in TABLES:
        files = [str(part.path).translate(_GLOB) for t in traces for part in t.parts.get(table, [])]
        frames = [_read(session, table, files)] if files or not uris else []
        for uri in uris:
            try:  # a URI whose trace lacks the table reads as none (as a local trace without it)
                frames.append(_read(session, table, [f"{uri.rstrip('/')}/{table}/part-*.parquet"]))
            except engine.query_errors():
                continue
        df = functools.reduce(lambda a, b: a.unionByName(b), frames) if frames else _read(session, table, [])
        if cache:
            df = df.cache()
            engine._cached_views.append(df)  # unpersisted by close()
        df.createOrReplaceTempView(table)
    return engine
