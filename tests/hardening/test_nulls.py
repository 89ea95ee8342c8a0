"""Nulls in a trace: where the format requires a value, every command refuses the trace in one line
(exit 2) naming the column; where it allows one (a reading not taken), every command reads it.
Found by mutating shipped traces: a null t_ns, seq_len or stored_tokens reached the detectors and a
null post-empty-cache reading the report's retention figure as internal errors (exit 3)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hardening_helpers import one_line_error

Cli = Callable[..., tuple[int, str, str]]


def _set_null(trace: Path, table: str, column: str, row: int = 0) -> Path:
    part = next((trace / table).glob("part-*.parquet"))
    data = pq.read_table(part)
    i = data.schema.get_field_index(column)
    values = data[column].to_pylist()
    values[row] = None
    data = data.set_column(i, pa.field(column, data.schema.field(i).type), pa.array(values, data.schema.field(i).type))
    pq.write_table(data, part)
    return trace


@pytest.mark.parametrize(("table", "column"), [("steps", "t_ns"), ("steps", "seq_len"), ("layers", "stored_tokens"),
                                               ("layers", "layer"), ("generations", "ended_ns")])
def test_a_null_where_the_format_requires_a_value_is_refused_in_one_line(
        trace: Path, tmp_path: Path, cli: Cli, table: str, column: str) -> None:
    bad = _set_null(trace, table, column, row=3 if table != "generations" else 1)
    for args in (("analyze", bad), ("report", bad, "-o", tmp_path / "r.html"), ("sql", bad, "SELECT 1"),
                 ("export", bad, "--perfetto", "-o", tmp_path / "e.json")):
        code, _out, err = cli(*args)
        line = one_line_error(err)
        assert code == 2, (args, err)
        assert f"column '{column}' of table '{table}' holds null values" in line and str(bad) in line, line
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "e.json").exists()
    code, out, _err = cli("inspect", bad)
    assert code == 2 and f"column '{column}' of table '{table}' holds null values" in " ".join(out.split())


def test_null_readings_where_the_format_allows_them_are_read_by_every_command(
        trace: Path, tmp_path: Path, cli: Cli) -> None:
    # generation 0: NVML read, its post-empty-cache reserved reading not; generation 1: no NVML baseline
    for column, row in (("post_empty_cache_reserved_bytes", 0), ("post_release_allocated_bytes", 0),
                        ("baseline_nvml_used_bytes", 1)):
        _set_null(trace, "generations", column, row=row)
    _set_null(trace, "steps", "allocated_bytes", row=2)
    for args in (("inspect", trace), ("analyze", trace, "--format", "json"), ("report", trace, "-o", tmp_path / "r.html"),
                 ("export", trace, "--perfetto", "-o", tmp_path / "e.json"), ("export", trace, "--prometheus"), ("diff", trace, trace)):
        code, _out, err = cli(*args)
        assert code in (0, 1) and "internal error" not in err and "Traceback" not in err, (args, err)
    assert (tmp_path / "r.html").stat().st_size > 10_000


def test_non_finite_doubles_reach_the_report_as_gaps(trace: Path, tmp_path: Path, cli: Cli) -> None:
    """head_stats values of inf and NaN (the format allows any double): the report's figures show
    them as gaps (JSON has no NaN; json.dumps(allow_nan=False) raised ValueError before)."""
    from kvscope.trace.writer import TraceWriter

    run_id = pq.read_table(next((trace / "run").glob("*.parquet")))["run_id"][0].as_py()
    with TraceWriter(trace) as writer:
        writer.extend("head_stats", {"run_id": [run_id] * 4, "gen_id": [0] * 4, "step": [0, 0, 16, 16],
                                     "layer": [0] * 4, "head": [0, 1, 0, 1], "stat": ["key_norm_mean"] * 4,
                                     "value": [float("inf"), 1.0, float("nan"), -float("inf")], "tokens": [64] * 4,
                                     "source": ["online"] * 4})
    code, _out, err = cli("report", trace, "-o", tmp_path / "r.html")
    assert code in (0, 1) and "internal error" not in err, err
    assert "Infinity" not in (tmp_path / "r.html").read_text()
