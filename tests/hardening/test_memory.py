"""Running out of memory is a one-line exit 2, and the checks hold big-but-small traces in bounded memory."""

from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hardening_helpers import one_line_error

from kvscope.analyzer import load as load_module
from kvscope.analyzer import sql as sql_module
from kvscope.errors import TraceError
from kvscope.trace.writer import write_options

Cli = Callable[..., tuple[int, str, str]]
HUNGRY = "SELECT string_agg(repeat('x', 1000) || i::VARCHAR, ',') FROM range(200000) t(i), layers"


def test_duckdb_out_of_memory_is_a_trace_error(trace: Path) -> None:
    with load_module.load_traces([trace], memory_limit="16MB", threads=1) as t:
        with pytest.raises(TraceError, match="out of memory"):
            t.rows(HUNGRY)


def test_sql_out_of_memory_exits_2(trace: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sql_module, "load_traces", functools.partial(load_module.load_traces, memory_limit="16MB",
                                                                     threads=1))
    code, _out, err = cli("sql", trace, HUNGRY, "--format", "csv")
    assert code == 2 and "out of memory" in one_line_error(err)


def test_many_rows_in_a_small_file_checked_in_bounded_memory(trace: Path) -> None:
    """8 M identical layers rows (dictionary/RLE: about 1 MB on disk): inspect stays far below what
    whole columns would take, in a fresh process (its peak RSS is the measure)."""
    part = next((trace / "layers").glob("part-*.parquet"))
    block = pq.read_table(part).take(pa.array(np.zeros(1 << 20, dtype=np.int64)))  # one row, 1 M times
    for old in (trace / "layers").glob("part-*.parquet"):
        old.unlink()
    from kvscope.schema.tables import TABLES

    with pq.ParquetWriter(trace / "layers" / "part-many.parquet", block.schema,
                          **write_options(TABLES["layers"], block.schema)) as writer:
        for _ in range(8):
            writer.write_table(block)
    assert (trace / "layers" / "part-many.parquet").stat().st_size < 4 << 20
    # the peak of this process alone (VmHWM starts afresh at exec; ru_maxrss would carry pytest's over)
    code = ("import sys\nfrom kvscope.cli.main import main\n"
            f"rc = main(['inspect', {str(trace)!r}, '--format', 'json'])\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
            "print(hwm, file=sys.stderr)\nsys.exit(rc)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    peak_kib = int(result.stderr.strip().splitlines()[-1])
    assert '"rows": 8388608' in result.stdout
    # whole columns of 8 M rows (16 columns, lists of shapes) take well over 1 GiB in Arrow
    assert peak_kib < 600 * 1024, (peak_kib, str(trace))
