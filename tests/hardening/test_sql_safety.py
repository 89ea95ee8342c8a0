"""SQL built from trace data runs as one statement; `kvscope sql` is locked down unless --unsafe."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hardening_helpers import one_line_error

from kvscope.analyzer.load import load_traces

Cli = Callable[..., tuple[int, str, str]]


def _add_column(trace: Path, table: str, name: str) -> None:
    part = next((trace / table).glob("part-*.parquet"))
    data = pq.read_table(part)
    metadata = data.schema.metadata
    data = data.append_column(name, pa.array([1] * data.num_rows)).replace_schema_metadata(metadata)
    pq.write_table(data, part)


def test_column_name_cannot_inject_sql(trace: Path, tmp_path: Path, cli: Cli) -> None:
    """An extra column whose name closes the quote and appends a COPY is only a strange column name."""
    target = tmp_path / "pwned.csv"
    name = f'a" FROM (SELECT 1 AS "a"); COPY (SELECT 42) TO \'{target}\' (FORMAT csv); SELECT "a'
    _add_column(trace, "layers", name)
    with load_traces([trace]) as t:
        assert t.rows("SELECT count(*) FROM layers") == [(64,)]
        assert name in [r[0] for r in t.rows("SELECT column_name FROM (DESCRIBE layers)")]
    for args in (("sql", trace, "SELECT 1", "--format", "json"), ("analyze", trace, "--format", "json"),
                 ("diff", trace, trace, "--format", "json")):
        code, _out, err = cli(*args)
        assert code == 0, err
    assert not target.exists(), "a column name ran a COPY"
    code, out, _err = cli("sql", trace, "SELECT count(*) AS n FROM layers", "--format", "json")
    assert code == 0 and json.loads(out) == [{"n": 64}]


def test_extra_column_with_quotes_reads_back(trace: Path) -> None:
    _add_column(trace, "steps", 'we"ird')
    with load_traces([trace]) as t:
        assert t.rows('SELECT sum("we""ird") FROM steps') == [(16,)]  # one of the two steps parts has it


@pytest.mark.parametrize(("query", "why"), [
    ("SELECT * FROM read_csv('/etc/passwd')", "Permission"),
    ("SELECT * FROM read_blob('/root/.*')", "Permission"),
    ("SELECT * FROM glob('/*')", "Permission"),
    ("SELECT * FROM read_parquet('{trace}/layers/*.parquet')", "Permission"),
    ("COPY (SELECT 1) TO '{tmp}/out.csv'", "not COPY"),
    ("ATTACH '{tmp}/x.db' AS x", "not ATTACH"),
    ("DROP VIEW layers", "not DROP"),
    ("CREATE TABLE t AS SELECT 1", "not CREATE"),
    ("SET memory_limit = '200GB'", "not SET"),
    ("PRAGMA enable_profiling", "not PRAGMA"),
    ("INSTALL httpfs", "not LOAD"),
    ("LOAD httpfs", "not LOAD"),
    ("SELECT 1; DROP VIEW layers", "exactly one statement"),
    ("SELECT 1; SELECT 2", "exactly one statement"),
    ("SELECT * FROM query('COPY (SELECT 1) TO ''{tmp}/q.csv''')", "failed"),
    ("SELECT * FROM read_parquet('https://example.com/x.parquet')", "failed"),
])
def test_sql_refuses(trace: Path, tmp_path: Path, cli: Cli, query: str, why: str) -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = cli("sql", trace, query.format(trace=trace, tmp=tmp_path), "--format", "csv")
    line = one_line_error(err)
    assert code == 2 and why in line and out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "the query wrote a file"
    code, out, _ = cli("sql", trace, "SELECT count(*) AS n FROM layers", "--format", "json")
    assert code == 0 and json.loads(out) == [{"n": 64}]


def test_read_only_queries_still_work(trace: Path, tmp_path: Path, cli: Cli) -> None:
    for query in ("WITH a AS (SELECT max(step) m FROM steps) SELECT m FROM a", "FROM run SELECT run_id",
                  "DESCRIBE layers", "SUMMARIZE steps", "EXPLAIN SELECT * FROM layers", "VALUES (1)"):
        code, _out, err = cli("sql", trace, query, "--format", "csv")
        assert code == 0, (query, err)
    out_file = tmp_path / "layer0.parquet"
    code, _out, err = cli("sql", trace, "SELECT * FROM layers WHERE layer = 0", "--format", "parquet",
                          "-o", out_file)
    assert code == 0, err
    assert pq.read_table(out_file).num_rows == 32


def test_unsafe_is_plain_duckdb(trace: Path, tmp_path: Path, cli: Cli) -> None:
    target = tmp_path / "out.csv"
    code, _out, err = cli("sql", trace, f"COPY (SELECT count(*) FROM layers) TO '{target}'", "--unsafe")
    assert code == 0, err
    assert target.read_text().splitlines()[-1] == "64"
