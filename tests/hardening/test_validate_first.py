"""analyze, sql, diff and tune check a trace as inspect does before they read it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hardening_helpers import one_line_error

Cli = Callable[..., tuple[int, str, str]]


def _negative_bytes(trace: Path) -> Path:
    part = next((trace / "steps").glob("part-*.parquet"))
    data = pq.read_table(part)
    i = data.schema.get_field_index("kv_bytes")
    data = data.set_column(i, data.schema.field(i), pa.array([-1] * data.num_rows, pa.int64()))
    pq.write_table(data, part)
    return trace


def test_invalid_trace_refused_by_every_command(trace: Path, tmp_path: Path, cli: Cli) -> None:
    good = shutil.copytree(trace, tmp_path / "good")
    bad = _negative_bytes(trace)
    labels = tmp_path / "labels.csv"
    labels.write_text("run_id,expected\nx,1\n")
    for args in (("inspect", bad), ("analyze", bad), ("analyze", bad, "--format", "json"),
                 ("sql", bad, "SELECT 1"), ("diff", good, bad), ("diff", bad, good),
                 ("tune", bad, "--labels", labels, "--detector", "fragmentation", "--param", "max_mean_fraction",
                  "--range", "0.1:0.2:0.1")):
        code, _out, err = cli(*args)
        assert code == 2, (args, err)
        if args[0] != "inspect":
            line = one_line_error(err)
            assert "negative value" in line and str(bad) in line, line
    for args in (("analyze", bad, "--no-validate", "--format", "json"), ("sql", bad, "SELECT 1", "--no-validate"),
                 ("diff", good, bad, "--no-validate")):
        code, _out, err = cli(*args)
        assert code == 0, (args, err)


def test_analyze_parent_skip_bad(trace: Path, tmp_path: Path, cli: Cli) -> None:
    parent = tmp_path / "traces"
    parent.mkdir()
    shutil.copytree(trace, parent / "a_good")
    _negative_bytes(shutil.copytree(trace, parent / "b_bad"))
    shutil.copytree(trace, parent / "c_good")
    (parent / "c_good" / "run" / "part-zz.parquet").write_bytes(b"PAR1 not parquet")  # a broken one too
    code, _out, err = cli("analyze", parent)
    assert code == 2 and "b_bad" in one_line_error(err)
    code, out, err = cli("analyze", parent, "--skip-bad", "--format", "json")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("kvscope: error: skipped: ") for line in lines)
    assert "b_bad" in lines[0] and "c_good" in lines[1] and "Traceback" not in err
    assert out.strip().startswith("[")


def test_inspect_parent_reports_each_bad_trace(trace: Path, tmp_path: Path, cli: Cli) -> None:
    parent = tmp_path / "traces"
    parent.mkdir()
    shutil.copytree(trace, parent / "a_good")
    broken = shutil.copytree(trace, parent / "b_broken")
    next((broken / "run").glob("part-*.parquet")).write_bytes(b"not parquet")
    _negative_bytes(shutil.copytree(trace, parent / "c_invalid"))
    code, out, err = cli("inspect", parent, "--format", "json")
    assert code == 2 and "b_broken" in err and "Traceback" not in err
    reports = json.loads(out)
    assert [r["valid"] for r in reports] == [True, False]
